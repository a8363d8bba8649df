"""noisescale._digits: an estimate printed with the digits its interval supports (a statistical audit, session 25:
B_simple printed with 4 digits where its 90% interval is about +-30% and repeat runs differ in the third)."""

from __future__ import annotations

import math

import pytest

from noisescale._digits import UNBOUNDED, printed, printed_b_simple, with_significant_digits


@pytest.mark.parametrize("value, low, high, shown", [
    (127.6, 98.95, 179.6, ("128", "99", "180")),          # the quick start's: 127.6 (98.95 .. 179.6) before
    (315.7, 176.5, 1558.0, ("320", "180", "1560")),       # the narrower side, 139, sets the place: tens
    (7.536, 7.209, 7.863, ("7.54", "7.21", "7.86")),
    (28.37, 16.8, math.inf, ("28", "17", "inf")),         # unbounded above: the lower side alone
    (72.72, math.nan, math.nan, ("73", "nan", "nan")),     # no interval: 2 significant digits
    (127.6, 0.0, math.inf, ("130", "0", "inf")),           # nothing resolved: 2 significant digits
    (1.3, -178.0, 180.0, ("1", "-178", "180")),           # the value keeps 1 digit (a review: B_noise printed 0)
    (1.2e-5, 1.0e-5, 1.5e-5, ("1.20e-05", "1.00e-05", "1.50e-05")),
    (5.0, 4.5, 2.0e7, ("5.00e+00", "4.50e+00", "2.000e+07")),   # one notation a line, 4 digits at most each
    (100.0, 99.99, 100.01, ("100.0", "100.0", "100.0")),   # at most 4 significant digits
    (math.inf, 17761.0, math.inf, ("inf", "18000", "inf")),   # a fit at a limit: its finite bound's 2 digits
    (0.0, 0.0, 2.09, ("0", "0", "2.1")),
])
def test_an_estimate_and_its_bounds_are_rounded_one_place_below_the_intervals_leading_digit(value, low, high, shown):
    assert printed(value, low, high)[1:] == shown


def test_the_rounding_moves_a_value_by_at_most_a_tenth_of_its_intervals_narrower_side_below_the_cap():
    """The property the rule is for: what is dropped is below the interval's resolution (where the 4-digit cap does
    not bind: an interval narrower than the value's fourth digit is not resolved in print)."""
    for value, low, high in [(127.6, 98.95, 179.6), (0.0123, 0.0101, 0.0177), (5432.1, 5000.0, 6100.0)]:
        shown = printed(value, low, high)
        assert abs(float(shown.value) - value) <= 0.1 * min(value - low, high - value)
        assert abs(float(shown.value) - value) <= 0.5 * 10.0**shown.place


def test_significant_digits_keep_their_trailing_zeros():
    assert [with_significant_digits(v, 2) for v in (0.00298, 3.969, 1.0e8)] == ["0.0030", "4.0", "1.0e+08"]


def test_a_b_simple_interval_without_an_upper_bound_is_written_as_unbounded():
    shown = printed_b_simple(58.3, 12.4, math.inf)
    assert (shown.value, shown.low, shown.high) == ("58", "12", UNBOUNDED)
    assert printed_b_simple(58.3, 12.4, math.inf, unbounded="no upper bound").high == "no upper bound"
    assert printed_b_simple(127.6, 98.95, 179.6) == printed(127.6, 98.95, 179.6)   # a finite bound is printed
