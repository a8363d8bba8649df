"""Tests of noisescale.nqm against a Monte-Carlo simulation of the noisy updates, the paper's closed forms
(eqs. 4, 6, 9, 12 and Theorem 1 of Zhang et al. 2019) and the paper's qualitative claims (section 3.7)."""

from __future__ import annotations

import numpy as np
import pytest

from noisescale import nqm
from noisescale.app.cli import main

BATCH_SIZES = 2.0 ** np.arange(21)
TUNED_EMA_GRID = (0.0,) + tuple(1.0 - 2.0 ** -np.arange(2.0, 21.0, 2.0))


# ------------------------------------------------------------------------------------------------
# Monte-Carlo simulation of the actual noisy update (independent of the closed forms)


def simulate_risk(model, optimizer, learning_rate_at, batch_size, times, *, replicas=20_000, seed=0):
    """Mean and standard error of L over ``replicas`` runs of eqs. (2), (5), (8), (11) with sampled noise."""
    rng = np.random.default_rng(seed)
    h, c = model.curvatures, model.noise_variances
    preconditioner = h ** (-optimizer.precondition_power)
    theta = rng.normal(0.0, np.sqrt(model.initial_variance), size=(replicas, h.size))
    buffer = np.zeros_like(theta)
    average = theta.copy()
    means, errors = [], []
    for step in range(max(times) + 1):
        if step in times:
            evaluated = average if optimizer.ema else theta
            loss = 0.5 * (h * evaluated**2).sum(axis=1)
            means.append(loss.mean())
            errors.append(loss.std(ddof=1) / np.sqrt(replicas))
        gradient = h * theta + np.sqrt(c / batch_size) * rng.standard_normal(theta.shape)
        buffer = optimizer.momentum * buffer + preconditioner * gradient
        theta = theta - learning_rate_at(step) * buffer
        average = optimizer.ema * average + (1.0 - optimizer.ema) * theta
    return np.array(means), np.array(errors)


SMALL_MODEL = nqm.noisy_quadratic_model(1.0 / np.arange(1, 7))  # exact mode, d = 6, C = H
TIMES = [1, 5, 20, 60, 150]


@pytest.mark.parametrize(
    "optimizer, learning_rate, batch_size",
    [
        (nqm.OptimizerSetting(), 0.5, 2.0),
        (nqm.OptimizerSetting(momentum=0.9), 0.08, 4.0),
        (nqm.OptimizerSetting(precondition_power=0.5), 0.3, 2.0),
        (nqm.OptimizerSetting(ema=0.9), 0.5, 1.0),
        (nqm.OptimizerSetting(momentum=0.8, precondition_power=0.5, ema=0.7), 0.1, 3.0),
    ],
    ids=["sgd", "momentum", "precondition", "ema", "momentum-precondition-ema"],
)
def test_expected_risk_matches_monte_carlo(optimizer, learning_rate, batch_size):
    exact = nqm.expected_risk(SMALL_MODEL, optimizer, learning_rate, batch_size, TIMES)
    mean, error = simulate_risk(SMALL_MODEL, optimizer, lambda step: learning_rate, batch_size, TIMES)
    assert np.all(np.abs(exact - mean) < 3 * error), (exact, mean, error)


def test_schedule_risk_matches_monte_carlo():
    schedule = nqm.PiecewiseConstantSchedule(learning_rates=(0.9, 0.3, 0.05), boundaries=(10, 40))
    optimizer = nqm.OptimizerSetting(momentum=0.5, ema=0.5)
    times = [5, 10, 25, 40, 41, 100]
    exact = nqm.expected_risk(SMALL_MODEL, optimizer, schedule, 2.0, times)

    def learning_rate_at(step):
        return 0.9 if step < 10 else 0.3 if step < 40 else 0.05

    mean, error = simulate_risk(SMALL_MODEL, optimizer, learning_rate_at, 2.0, times, seed=1)
    assert np.all(np.abs(exact - mean) < 3 * error), (exact, mean, error)


def test_one_piece_schedule_equals_constant_learning_rate():
    optimizer = nqm.OptimizerSetting(momentum=0.7)
    times = np.array([0, 3, 17, 400])
    constant = nqm.expected_risk(SMALL_MODEL, optimizer, 0.2, 8.0, times)
    pieces = nqm.PiecewiseConstantSchedule(learning_rates=(0.2, 0.2), boundaries=(9,))
    np.testing.assert_allclose(nqm.expected_risk(SMALL_MODEL, optimizer, pieces, 8.0, times), constant, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Closed forms of the paper


def one_direction(h, c):
    return nqm.noisy_quadratic_model([h], [c])


def test_sgd_matches_eq4():
    h, c, alpha, batch = 0.3, 0.7, 0.9, 5.0
    times = np.array([0, 1, 7, 50])
    decay = (1 - alpha * h) ** (2 * times)
    eq4 = decay * 0.5 * h + alpha * c / (2 * batch * (2 - alpha * h)) * (1 - decay)
    np.testing.assert_allclose(nqm.expected_risk(one_direction(h, c), nqm.OptimizerSetting(), alpha, batch, times),
                               eq4, rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 1.5])  # overdamped (real roots) and underdamped (complex roots)
def test_deterministic_momentum_follows_theorem1_roots(alpha):
    h, beta = 0.5, 0.6
    r1, r2 = nqm.momentum_roots(alpha, h, beta)
    assert r1 * r2 == pytest.approx(beta) and r1 + r2 == pytest.approx(1 - alpha * h + beta)
    times = np.arange(0, 30)
    amplitude = ((r1 ** (times + 1) - r2 ** (times + 1)) - beta * (r1**times - r2**times)) / (r1 - r2)
    expected = np.real(amplitude) ** 2 * 0.5 * h
    risk = nqm.expected_risk(one_direction(h, 0.0), nqm.OptimizerSetting(momentum=beta), alpha, 1.0, times)
    np.testing.assert_allclose(risk, expected, rtol=1e-9, atol=1e-15)


def test_steady_states_match_eqs_6_9_12():
    h, c, alpha, batch = 0.2, 0.5, 0.7, 3.0
    model = one_direction(h, c)
    beta, gamma, p = 0.8, 0.9, 0.5
    eq6 = (1 + beta) * alpha * c / (2 * batch * (2 * beta + 2 - alpha * h) * (1 - beta))
    eq9 = alpha * c * h**-p / (2 * batch * (2 - alpha * h ** (1 - p)))
    eq12 = (alpha * c * (1 - gamma) * (1 + (1 - alpha * h) * gamma)
            / (2 * batch * (2 - alpha * h) * (1 + gamma) * (1 - (1 - alpha * h) * gamma)))
    assert nqm.steady_state_risk(model, nqm.OptimizerSetting(momentum=beta), alpha, batch) == pytest.approx(eq6, rel=1e-10)
    assert nqm.steady_state_risk(model, nqm.OptimizerSetting(precondition_power=p), alpha, batch) == pytest.approx(eq9, rel=1e-10)
    assert nqm.steady_state_risk(model, nqm.OptimizerSetting(ema=gamma), alpha, batch) == pytest.approx(eq12, rel=1e-10)


def test_steps_to_target_is_the_first_step_below_target():
    model = nqm.paper_model(dim=200, n_bins=20)
    optimizer = nqm.OptimizerSetting(momentum=0.5)
    steps = nqm.steps_to_target(model, optimizer, [0.02, 0.1], [16.0, 256.0], target=0.05)
    assert np.all(np.isfinite(steps))
    for i, rate in enumerate([0.02, 0.1]):
        for j, batch in enumerate([16.0, 256.0]):
            t = int(steps[i, j])
            before, at = nqm.expected_risk(model, optimizer, rate, batch, [t - 1, t])
            assert before > 0.05 >= at


def recurrence_risk(model, optimizer, learning_rate_at, batch_size, n_steps):
    """E[L(t)] for t = 0..n_steps by the plain second-moment recurrence S <- M S M^T + (c~ / B) b b^T of the
    update x = (theta, m, theta~) per direction, one step at a time (independent of the library's search)."""
    p = optimizer.precondition_power
    h_eff = model.curvatures ** (1 - p)
    c_eff = model.noise_variances * model.curvatures ** (-2 * p)
    beta, gamma = optimizer.momentum, optimizer.ema
    second = np.zeros((h_eff.size, 3, 3))
    second[:, [0, 0, 2, 2], [0, 2, 0, 2]] = model.initial_variance
    read = 2 if gamma else 0
    risks = []
    for step in range(n_steps + 1):
        risks.append(0.5 * np.sum(model.counts * model.curvatures * second[:, read, read]))
        alpha = learning_rate_at(step)
        m = np.zeros((h_eff.size, 3, 3))
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = 1 - alpha * h_eff, -alpha * beta, h_eff, beta
        m[:, 2, :2], m[:, 2, 2] = (1 - gamma) * m[:, 0, :2], gamma
        b = np.stack([np.full_like(h_eff, -alpha), np.ones_like(h_eff), np.full_like(h_eff, -(1 - gamma) * alpha)], 1)
        noise = (c_eff / batch_size)[:, None, None] * b[:, :, None] * b[:, None, :]
        second = m @ second @ m.transpose(0, 2, 1) + noise
    return np.array(risks)


def first_below(risks, target):
    below = np.nonzero(risks <= target)[0]
    return float(below[0]) if below.size else np.inf


def test_steps_to_target_finds_a_dip_between_grid_times():
    # issue 14: with momentum the risk oscillates; here it dips below the target at step 80 only (the grid has
    # every other step there) and the grid-plus-bisection search returned 105
    model = nqm.noisy_quadratic_model([0.16, 0.015], [0.049, 0.061])
    optimizer, rate, batch, target = nqm.OptimizerSetting(momentum=0.9), 0.83, 1024.0, 2.27e-4
    risks = recurrence_risk(model, optimizer, lambda step: rate, batch, 200)
    assert first_below(risks, target) == 80 and risks[79] > target and risks[81] > target  # a one-step dip
    assert nqm.steps_to_target(model, optimizer, [rate], [batch], target=target)[0, 0] == 80
    np.testing.assert_allclose(nqm.expected_risk(model, optimizer, rate, batch, np.arange(201)), risks, rtol=1e-9)
    curve = nqm.steps_vs_batch_size(model, optimizer, [batch], learning_rates=[rate], target=target)
    chosen = recurrence_risk(model, optimizer, lambda step: curve.learning_rates[0], batch, 200)
    assert curve.steps[0] == first_below(chosen, target) <= 80


@pytest.mark.parametrize(
    "optimizer",
    [nqm.OptimizerSetting(), nqm.OptimizerSetting(momentum=0.9), nqm.OptimizerSetting(momentum=0.5),
     nqm.OptimizerSetting(precondition_power=0.5), nqm.OptimizerSetting(ema=0.8),
     nqm.OptimizerSetting(momentum=0.8, precondition_power=0.5, ema=0.6)],
    ids=["sgd", "momentum-0.9", "momentum-0.5", "precondition", "ema", "momentum-precondition-ema"],
)
def test_search_matches_the_step_by_step_recurrence_on_random_models(optimizer):
    rng = np.random.default_rng(7)
    horizon = 700
    for _ in range(4):
        h = np.sort(10 ** rng.uniform(-2, 0, 3))[::-1]
        model = nqm.noisy_quadratic_model(h, h * 10 ** rng.uniform(-1, 1, 3))
        limit = 2 * (1 + optimizer.momentum) / h.max() ** (1 - optimizer.precondition_power)
        rates = limit * np.array([0.02, 0.2, 0.6, 0.95])
        batches = np.array([1.0, 16.0, 1024.0])
        risks = {(rate, batch): recurrence_risk(model, optimizer, lambda step, r=rate: r, batch, horizon)
                 for rate in rates for batch in batches}
        # targets at the risk of a random step: a momentum curve often dips there for a step or two
        for target in [risks[rates[2], batches[1]][rng.integers(20, 600)] * (1 + 1e-9), 0.05]:
            expected = np.array([[first_below(risks[rate, batch], target) for batch in batches] for rate in rates])
            steps = nqm.steps_to_target(model, optimizer, rates, batches, target=target, max_steps=horizon)
            np.testing.assert_array_equal(steps, expected)
            curve = nqm.steps_vs_batch_size(model, optimizer, batches, learning_rates=rates, target=target,
                                            max_steps=horizon)
            for j, batch in enumerate(batches):  # the winner's steps are its exact first crossing
                if np.isfinite(curve.steps[j]):
                    chosen = recurrence_risk(model, optimizer, lambda step: curve.learning_rates[j], batch, horizon)
                    assert curve.steps[j] == first_below(chosen, target)
                else:
                    assert np.isinf(expected[:, j]).all()


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_bins_with_equal_effective_curvature_are_merged_exactly(power):
    # bins with the same h~ share M, so the search sees them as one bin (with p = 1 the whole model is one bin);
    # risks and first crossings still match the step-by-step recurrence of every direction
    rng = np.random.default_rng(13)
    h = np.array([0.9, 0.2, 0.9, 0.05, 0.2])
    model = nqm.noisy_quadratic_model(h, h * 10 ** rng.uniform(-1, 1, 5))
    system = nqm._first_moment(model, power, np.array([0.1]), np.zeros(1), np.zeros(1))
    assert system.weights.size == (1 if power == 1.0 else 3)
    horizon, batches = 600, np.array([1.0, 16.0, 1024.0])
    for momentum in (0.0, 0.9):
        optimizer = nqm.OptimizerSetting(momentum=momentum, precondition_power=power)
        rates = 2 * (1 + momentum) / h.max() ** (1 - power) * np.array([0.02, 0.2, 0.6, 0.95])
        risks = {(rate, batch): recurrence_risk(model, optimizer, lambda step, r=rate: r, batch, horizon)
                 for rate in rates for batch in batches}
        np.testing.assert_allclose(nqm.expected_risk(model, optimizer, rates[2], 16.0, np.arange(horizon + 1)),
                                   risks[rates[2], 16.0], rtol=1e-9)
        for target in [risks[rates[2], batches[1]][rng.integers(20, 500)] * (1 + 1e-9), 0.05]:
            expected = np.array([[first_below(risks[rate, batch], target) for batch in batches] for rate in rates])
            steps = nqm.steps_to_target(model, optimizer, rates, batches, target=target, max_steps=horizon)
            np.testing.assert_array_equal(steps, expected)
            curve = nqm.steps_vs_batch_size(model, optimizer, batches, learning_rates=rates, target=target,
                                            max_steps=horizon, momenta=(0.0, 0.5, 0.9), emas=(0.0, 0.75))
            for j, batch in enumerate(batches):  # the winner's steps are its exact first crossing
                if np.isfinite(curve.steps[j]):
                    chosen = nqm.OptimizerSetting(curve.momenta[j], power, curve.emas[j])
                    risk = recurrence_risk(model, chosen, lambda step: curve.learning_rates[j], batch, horizon)
                    assert curve.steps[j] == first_below(risk, target)


CRITICAL_DAMPING_GRID = [
    (nqm.OptimizerSetting(), {}),  # one real mode per direction: the octave floor is D at the octave's end
    (nqm.OptimizerSetting(precondition_power=0.5), {}),
    (nqm.OptimizerSetting(momentum=0.9), {}),
    (nqm.OptimizerSetting(), {"momenta": (0.0, 0.9), "emas": (0.0, 0.5, 0.9)}),
    (nqm.OptimizerSetting(precondition_power=0.5), {"momenta": (0.0, 0.8), "emas": (0.0, 0.75)}),
    (nqm.OptimizerSetting(precondition_power=1.0), {"emas": (0.0, 0.5, 0.75)}),  # r1 = 1 - alpha = gamma
]
GRID_IDS = ["sgd", "sgd-precondition", "momentum", "tuned", "precondition", "confluent-ema"]


def random_model_and_rates(rng, optimizer, grids):
    """A 3-direction model and learning rates that include critical damping (a repeated root of M) of each
    direction for each momentum, and r1 = 1 - alpha h~ = gamma for each EMA coefficient, next to the grid, so
    that defective and near-defective matrices are searched."""
    h = np.sort(10 ** rng.uniform(-2, 0, 3))[::-1]
    model = nqm.noisy_quadratic_model(h, h * 10 ** rng.uniform(-1, 1, 3))
    h_eff = h ** (1 - optimizer.precondition_power)
    momenta, emas = grids.get("momenta", (optimizer.momentum,)), grids.get("emas", (optimizer.ema,))
    critical = [(1 - np.sqrt(beta)) ** 2 / h_eff for beta in momenta if beta > 0]  # (1 - alpha h + beta)^2 = 4 beta
    confluent = [(1 - gamma) / h_eff for gamma in emas if gamma > 0]
    rates = np.unique(np.concatenate([np.array([0.02, 0.2, 0.6, 0.95]) * 2 / h_eff.max()] + critical + confluent))
    return model, rates


@pytest.mark.parametrize("optimizer, grids", CRITICAL_DAMPING_GRID, ids=GRID_IDS)
def test_octave_pass_never_skips_a_crossing(optimizer, grids):
    # the grid walk starts at 2^e - 1 for a row the octave pass certifies above the target until then, and skips
    # rows it certifies above the target up to the last grid time: checked against the step-by-step recurrence
    rng = np.random.default_rng(3)
    times, _ = nqm._time_grid(300)
    batches = np.array([1.0, 16.0, 1024.0])
    for _ in range(2):
        momenta, emas = grids.get("momenta", (optimizer.momentum,)), grids.get("emas", (optimizer.ema,))
        model, rates = random_model_and_rates(rng, optimizer, grids)
        configs = np.array([(a, b, g) for a in rates for b in momenta for g in emas]).T
        system = nqm._first_moment(model, optimizer.precondition_power, *configs)
        targets = (0.05, 0.3 * model.initial_risk)
        passes = [nqm._octave_crossings(system, batches, target, times) for target in targets]
        for target, (reached, _, _) in zip(targets, passes):  # the sample pass seeks only the earliest crossing
            earliest = nqm._octave_crossings(system, batches, target, times, earliest=True)[0]
            np.testing.assert_array_equal(earliest.min(axis=0), reached.min(axis=0))
        for k, (rate, beta, gamma) in enumerate(configs.T):
            setting = nqm.OptimizerSetting(beta, optimizer.precondition_power, gamma)
            for j, batch in enumerate(batches):
                if not system.stable[k]:  # diverges: never walked
                    assert all(np.isinf(start[k, j]) and np.isinf(reached[k, j]) for reached, _, start in passes)
                    continue
                risks = recurrence_risk(model, setting, lambda step: rate, batch, int(times[-1]))
                for target, (reached, _, walk_from) in zip(targets, passes):
                    first = first_below(risks, target)
                    if np.isinf(walk_from[k, j]):
                        assert np.isinf(first)
                    else:
                        assert first == 0 or first > 2 ** walk_from[k, j] - 1
                    if np.isfinite(reached[k, j]):
                        assert risks[int(reached[k, j])] <= target and first <= reached[k, j]


def test_confluent_floor_and_search_against_the_recurrence():
    # p = 1 makes h~ = 1 in every direction, so alpha = 1 - gamma gives r1 = gamma: M is defective in every
    # direction and u(t) = (A + B (t - 1)) gamma^(t-1); its floor bounds D on any interval and the search finds
    # every first crossing
    rng = np.random.default_rng(5)
    model = nqm.noisy_quadratic_model(np.array([1.0, 0.3, 0.05]), np.array([0.2, 1.0, 3.0]))
    for gamma in (0.5, 0.75, 0.96875):
        optimizer, rate = nqm.OptimizerSetting(precondition_power=1.0, ema=gamma), 1.0 - gamma
        system = nqm._first_moment(model, 1.0, np.array([rate]), np.zeros(1), np.array([gamma]))
        modes = nqm._modes(system)
        assert modes.confluent.all()
        deterministic = recurrence_risk(model, optimizer, lambda step: rate, 1e300, 400)
        for start, span in zip(rng.integers(0, 300, 40), rng.integers(0, 90, 40)):
            first, last = (modes.coefficients * modes.values**t for t in (start, start + span))
            floor = nqm._deterministic_floor(modes, system.weights, first, last, int(span), int(start))[0]
            assert floor <= deterministic[start + 1:start + span + 2].min() * (1 + 1e-9)
        batches = np.array([1.0, 64.0, 4096.0])
        risks = [recurrence_risk(model, optimizer, lambda step: rate, batch, 2000) for batch in batches]
        for target in (risks[1][rng.integers(50, 1900)] * (1 + 1e-9), 0.01):
            steps = nqm.steps_to_target(model, optimizer, [rate], batches, target=target, max_steps=2000)
            np.testing.assert_array_equal(steps[0], [first_below(r, target) for r in risks])


def test_octave_pass_sees_an_sgd_dip_between_octave_times():
    # SGD's risk need not be monotone: the decaying direction falls while the noisy low-curvature one rises, so
    # it dips below the target on (31, 63] (least at t = 40) and is above it at 31 and 63; the octave floor of
    # one real mode per direction (D at the octave's end plus N at its start) must send the walk there
    model = nqm.noisy_quadratic_model([1.0, 0.001], [0.0, 680.0])
    optimizer, rate, target = nqm.OptimizerSetting(), 0.05, 0.045
    risks = recurrence_risk(model, optimizer, lambda step: rate, 1.0, 300)
    first = first_below(risks, target)
    assert 31 < first < 40 and risks[31] > target and risks[63] > target
    times, _ = nqm._time_grid(300)
    system = nqm._first_moment(model, 0.0, np.array([rate]), np.zeros(1), np.zeros(1))
    walk_from = nqm._octave_crossings(system, np.array([1.0]), target, times)[2]
    assert 2 ** walk_from[0, 0] - 1 < first
    assert nqm.steps_to_target(model, optimizer, [rate], [1.0], target=target, max_steps=300)[0, 0] == first
    curve = nqm.steps_vs_batch_size(model, optimizer, [1.0], learning_rates=[rate], target=target, max_steps=300)
    assert curve.steps[0] == first


NEAR_CONFLUENT = [  # real positive eigenvalues, the largest two nearly equal: the modes' terms cancel
    (nqm.OptimizerSetting(momentum=0.5, precondition_power=1.0, ema=1 - 2.0**-9), 2.0**-10),  # one bin
    (nqm.OptimizerSetting(momentum=0.3, ema=1 - 2.0**-8), 2.0**-8),  # three bins, one near r1 = gamma
    (nqm.OptimizerSetting(ema=1 - 2.0**-7), 2.0**-6),  # two modes
]


def _near_confluent_system(optimizer, rate):
    """A three-direction model and its first-moment system at one learning rate."""
    model = nqm.noisy_quadratic_model([1.0, 0.3, 0.1], [1.0, 0.3, 0.1])
    return model, nqm._first_moment(model, optimizer.precondition_power, np.array([rate]),
                                    np.array([optimizer.momentum]), np.array([optimizer.ema]))


@pytest.mark.parametrize("optimizer, rate", NEAR_CONFLUENT, ids=["momentum-p1-ema", "momentum-ema", "ema"])
def test_floor_from_the_ends_bounds_the_recurrence(optimizer, rate):
    # a search's floor of D on [low, high] from u = v x0 at low, low + 1, high and high + 1, where every eigenvalue
    # is real and positive: checked against the step-by-step recurrence on random intervals, among them intervals
    # around the turn of w(t) = u(t) / lambda^t; it decides where the floor of the modes' terms is 0
    rng = np.random.default_rng(47)
    model, system = _near_confluent_system(optimizer, rate)
    search = nqm._RowSearch(system, 1.0)
    assert search.largest is not None
    deterministic = recurrence_risk(model, optimizer, lambda step: rate, np.inf, 3000)
    decided = better = 0
    for low, length in zip(rng.integers(4, 2000, 300), 2 ** rng.integers(0, 11, 300)):
        high = int(min(low + length, 3000))
        low = int(low)
        floor = search._ends_floor(low, high, search.state(low)[0], search.state(high)[0])
        least = deterministic[low:high + 1].min()
        assert floor <= least * (1 + 1e-9), (low, high, floor, least)
        decided += floor > 0.5 * least
        terms = [search.modes.coefficients * search.modes.values**t for t in (low, high - 1)]
        better += floor > nqm._deterministic_floor(search.modes, system.weights, *terms, high - low - 1, low)[0]
    assert decided > 100 and better > 50, (decided, better)
    # one direction from random row vectors v (mixed signs: u may change sign, |w| may turn), stepped one step at
    # a time
    system = nqm._first_moment(nqm.noisy_quadratic_model([0.3]), optimizer.precondition_power, np.array([rate]),
                               np.array([optimizer.momentum]), np.array([optimizer.ema]))
    search, weights = nqm._RowSearch(system, 1.0), system.initial_variance * system.weights
    turned = 0
    for _ in range(60):
        rows = [rng.normal(size=system.noise_input.shape)]
        for _ in range(2500):
            rows.append(nqm._advance(rows[-1], system.matrix))
        u = np.array([nqm._from_start(system, v)[0, 0] for v in rows])
        d = u * u * weights[0]
        change = np.nonzero(u[:-1] * u[1:] <= 0)[0]  # intervals at random and around a change of sign of u
        dip = int(change[0]) if change.size else int(rng.integers(0, 2000))
        starts = np.concatenate([rng.integers(0, 2000, 15), np.maximum(dip - 2 ** rng.integers(0, 10, 15), 0)])
        ends = np.concatenate([starts[:15] + 2 ** rng.integers(1, 11, 15), dip + 2 ** rng.integers(0, 10, 15)])
        for start, end in zip(starts, np.minimum(ends, 2500)):
            floor = search._ends_floor(4 + start, 4 + end, rows[start], rows[end])
            assert floor <= d[start:end + 1].min() * (1 + 1e-9), (start, end, floor, d[start:end + 1].min())
            turned += d[start:end + 1].min() < 0.5 * min(d[start], d[end])
    assert turned > 5, turned


@pytest.mark.parametrize("optimizer, rate", NEAR_CONFLUENT, ids=["momentum-p1-ema", "momentum-ema", "ema"])
def test_search_with_nearly_coinciding_modes_matches_the_recurrence(optimizer, rate):
    # the first step at or below a target placed at the recurrence's risk of a random step, noise included
    rng = np.random.default_rng(53)
    model, system = _near_confluent_system(optimizer, rate)
    for batch in (64.0, 4096.0):
        risks = recurrence_risk(model, optimizer, lambda step: rate, batch, 3000)
        for _ in range(20):
            low = int(rng.integers(0, 1500))
            high = low + int(rng.integers(1, 1500))
            target = risks[rng.integers(low + 1, high + 1)] * (1 + 1e-9)
            search = nqm._RowSearch(system, target).at_batch(batch)
            assert search.first(low, high) == first_below(risks[low + 1:high + 1], target) + low + 1


@pytest.mark.parametrize(
    "optimizer",
    [nqm.OptimizerSetting(), nqm.OptimizerSetting(ema=0.9), nqm.OptimizerSetting(momentum=0.9),
     nqm.OptimizerSetting(momentum=0.5, precondition_power=0.5, ema=0.75)],
    ids=["sgd", "ema", "momentum", "momentum-precondition-ema"],
)
def test_deterministic_floor_bounds_the_recurrence(optimizer):
    # the floor of D on [start + 1, start + span + 1] from the terms c mu^start and c mu^(start + span), for short
    # spans and for long ones where |mu^s - 1| <= 2 binds for every oscillating term; real-valued modes (no
    # momentum) come as real arrays; a search passes its terms down by mu^(2^e) and mu^(2^e - 1)
    rng = np.random.default_rng(17)
    for _ in range(3):
        model, rates = random_model_and_rates(rng, optimizer, {})
        system = nqm._first_moment(model, optimizer.precondition_power, rates, np.full(rates.size, optimizer.momentum),
                                   np.full(rates.size, optimizer.ema))
        modes = nqm._modes(system)
        assert np.iscomplexobj(modes.values) == (optimizer.momentum > 0)
        with np.errstate(divide="ignore"):  # log 0 = -inf: |log mu| is stored as 1e300
            np.testing.assert_allclose(modes.log_size, np.minimum(np.abs(np.log(modes.values + 0j)), 1e300),
                                       rtol=1e-12)
        for k, rate in enumerate(rates):
            if not system.stable[k]:
                continue
            deterministic = recurrence_risk(model, optimizer, lambda step: rate, 1e300, 700)
            one = modes.subset(np.array([k]))
            for start, span in zip(rng.integers(0, 300, 30), np.concatenate([rng.integers(0, 12, 15),
                                                                            rng.integers(50, 390, 15)])):
                first, last = (one.coefficients * one.values**int(t) for t in (start, start + span))
                floor = nqm._deterministic_floor(one, system.weights, first, last, int(span), int(start))[0]
                low = deterministic[start + 1:start + span + 2].min()
                assert floor <= low * (1 + 1e-9), (rate, start, span, floor, low)
            search = nqm._RowSearch(system.subset([k]), 1.0)
            for bit in (0, 3, 9):
                square, odd = search._mode_powers(bit)
                np.testing.assert_allclose(square, search.modes.values ** 2**bit, rtol=1e-12, atol=1e-300)
                np.testing.assert_allclose(odd, search.modes.values ** (2**bit - 1), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(
    "optimizer",
    [nqm.OptimizerSetting(momentum=0.9), nqm.OptimizerSetting(momentum=0.5), nqm.OptimizerSetting(ema=0.9),
     nqm.OptimizerSetting(momentum=0.5, precondition_power=0.5, ema=0.75)],
    ids=["momentum-0.9", "momentum-0.5", "ema", "momentum-precondition-ema"],
)
def test_size_form_floors_bound_the_recurrence(optimizer):
    # the size form of the modes (Re c mu^s of monotone terms, |c mu^s| of the others, in real arithmetic) gives
    # a floor of D at most the recurrence's minimum on [start + 1, start + span + 1], the complex form's floor
    # once span |log mu| >= 2; the floor without the clamp per bin is at most that, and _settling_floor settles
    # exactly the rows the floor per bin settles
    rng = np.random.default_rng(23)
    for _ in range(3):
        model, rates = random_model_and_rates(rng, optimizer, {})
        system = nqm._first_moment(model, optimizer.precondition_power, rates, np.full(rates.size, optimizer.momentum),
                                   np.full(rates.size, optimizer.ema))
        stable = np.nonzero(system.stable)[0]
        modes = nqm._modes(system).subset(stable)
        sized = modes.by_size(system.weights)
        least = min(modes.least_log_size)
        deterministic = [recurrence_risk(model, optimizer, lambda step, r=rate: r, 1e300, 700)
                         for rate in rates[stable]]
        for start, span in zip(rng.integers(0, 300, 20), np.concatenate([rng.integers(0, 12, 10),
                                                                        rng.integers(50, 390, 10)])):
            first, last = (modes.coefficients * modes.values**int(t) for t in (start, start + span))
            size_first, size_last = (sized.coefficients * sized.values**int(t) for t in (start, start + span))
            np.testing.assert_allclose(size_first, modes.to_size(first), rtol=1e-9, atol=1e-300)
            floor = nqm._deterministic_floor(sized, system.weights, size_first, size_last, int(span), int(start))
            unclamped = (np.einsum("pkb,pkb->k", size_first, sized.unclamped[0])
                         + np.einsum("pkb,pkb->k", size_last, sized.unclamped[1]))
            low = np.array([risks[start + 1:start + span + 2].min() for risks in deterministic])
            assert np.all(unclamped <= floor + 1e-12 * np.abs(floor)), (start, span, unclamped, floor)
            assert np.all(floor <= low * (1 + 1e-9)), (start, span, floor, low)
            if span * least >= 2:
                complex_floor = nqm._deterministic_floor(modes, system.weights, first, last, int(span), int(start))
                np.testing.assert_allclose(floor, complex_floor, rtol=1e-9, atol=1e-12 * model.initial_risk)
            for target in np.quantile(floor, [0.25, 0.5, 0.75]) * (1 + 1e-6) + 1e-30:  # clear of rounding
                noise_floor = target * rng.uniform(0, 0.5, (floor.size, 3))
                rows = rng.random(noise_floor.shape) < 0.7
                settling = nqm._settling_floor(sized, system.weights, size_first, size_last, int(span), int(start),
                                               noise_floor, rows, target)
                assert np.all(settling <= floor + 1e-12 * np.abs(floor))
                np.testing.assert_array_equal(rows & (settling[:, None] + noise_floor > target),
                                              rows & (floor[:, None] + noise_floor > target))


@pytest.mark.parametrize(
    "optimizer",
    [nqm.OptimizerSetting(), nqm.OptimizerSetting(momentum=0.9), nqm.OptimizerSetting(ema=0.9),
     nqm.OptimizerSetting(momentum=0.5, precondition_power=0.5, ema=0.75)],
    ids=["sgd", "momentum", "ema", "momentum-precondition-ema"],
)
@pytest.mark.parametrize("n_directions", [1, 3, 300])
def test_search_leaves_match_the_recurrence(optimizer, n_directions):
    # the last steps of a branch, evaluated at once from M^s x0 and M^(s-1) b (16 steps with many directions,
    # more with few; with one bin, as every model with p = 1, by products instead of matrix-vector products),
    # with the noise large enough to matter: the first step at or below a target placed at the recurrence's risk
    # of a random step
    rng = np.random.default_rng(29)
    h = np.sort(10 ** rng.uniform(-2.5, 0, n_directions))[::-1]
    model = nqm.noisy_quadratic_model(h, h * 10 ** rng.uniform(-1, 0.5, n_directions), initial_variance=1.5)
    rate = 0.02 * 2 * (1 + optimizer.momentum) / h.max() ** (1 - optimizer.precondition_power)
    system = nqm._first_moment(model, optimizer.precondition_power, np.array([rate]),
                               np.array([optimizer.momentum]), np.array([optimizer.ema]))
    leaf_steps = nqm._RowSearch(system, 1.0).leaf_steps
    for batch in (1.0, 8.0):
        risks = recurrence_risk(model, optimizer, lambda step: rate, batch, 700)
        for _ in range(30):
            low = int(rng.integers(0, 300))
            high = low + int(rng.integers(1, min(leaf_steps, 400) + 1))
            target = risks[rng.integers(low + 1, high + 1)] * (1 + 1e-9)
            search = nqm._RowSearch(system, target).at_batch(batch)
            assert search.first(low, high) == first_below(risks[low + 1:high + 1], target) + low + 1


def test_search_states_kept_for_reuse_match_the_recurrence():
    # a search keeps the last few states v(t), N(t) for itself and its copies at other batch sizes: risks asked
    # for in any order, with repeats and more distinct times than it keeps, match the step-by-step recurrence
    rng = np.random.default_rng(43)
    optimizer, rate = nqm.OptimizerSetting(momentum=0.8, ema=0.5), 0.3
    system = nqm._first_moment(SMALL_MODEL, 0.0, np.array([rate]), np.array([0.8]), np.array([0.5]))
    search = nqm._RowSearch(system, 1.0)
    batches = (1.0, 16.0)
    risks = {batch: recurrence_risk(SMALL_MODEL, optimizer, lambda step: rate, batch, 400) for batch in batches}
    times = rng.integers(0, 401, 30)
    for t in np.concatenate([times, times[::-1], times + 1]):
        for batch in batches:
            copy = search.at_batch(batch)
            assert copy.states is search.states
            assert copy.risk(int(t)) == pytest.approx(risks[batch][t], rel=1e-9)
    assert len(search.states) == nqm._KEPT_STATES


@pytest.mark.parametrize("optimizer, grids", CRITICAL_DAMPING_GRID, ids=GRID_IDS)
def test_grid_search_agrees_with_the_walk_of_every_row_from_the_start(optimizer, grids, monkeypatch):
    # the octave pass (rows walked from their own octave, rows that cannot win left out) changes nothing: the
    # reference walks every stable row from t = 0, as the search did before the octave pass
    rng = np.random.default_rng(11)
    batches = 2.0 ** np.arange(0, 21, 4)
    cases = []
    for _ in range(3):
        model, rates = random_model_and_rates(rng, optimizer, grids)
        for target in (0.05, 0.01 * model.initial_risk):
            cases.append((model, rates, target))
    search = [nqm.steps_vs_batch_size(model, optimizer, batches, learning_rates=rates, target=target, **grids)
              for model, rates, target in cases]
    octave_pass = nqm._octave_crossings

    def from_the_start(system, batch_sizes, target, times, until=None, earliest=False, **handover):  # no handover
        reached, risk_then, _ = octave_pass(system, batch_sizes, target, times, earliest=earliest)
        return reached, risk_then, np.where(system.stable[:, None], np.zeros_like(reached), np.inf)

    monkeypatch.setattr(nqm, "_octave_crossings", from_the_start)
    for curve, (model, rates, target) in zip(search, cases):
        reference = nqm.steps_vs_batch_size(model, optimizer, batches, learning_rates=rates, target=target, **grids)
        for name in ("steps", "learning_rates", "momenta", "emas"):
            np.testing.assert_array_equal(getattr(curve, name), getattr(reference, name))
        assert np.isfinite(curve.steps).any()


def test_mode_powers_of_the_walk_start_match_repeated_multiplication():
    # the walk's terms at its first grid time, c mu^(2^e - 1), and mu^(2^(e-6)), mu^(2^(e-6) - 2): exp(s log mu)
    # where every mu is real and >= 0 (zeros included), repeated squaring otherwise (complex or negative mu)
    rng = np.random.default_rng(37)
    real = np.concatenate([rng.uniform(0, 1, 50), [0.0, 1.0, 1 - 1e-12]])
    for values in (real, real - 0.5, real * np.exp(1j * rng.uniform(0, np.pi, real.size))):
        for exponent in (0, 1, 2, 7, 62, 2**10 - 1, 2**14 - 2):
            expected = np.ones_like(values)
            for _ in range(exponent):
                expected = expected * values
            np.testing.assert_allclose(nqm._mode_power(values, exponent), expected, rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("optimizer, grids, chunk_elements", [
    (nqm.OptimizerSetting(momentum=0.9), {}, None),
    (nqm.OptimizerSetting(precondition_power=0.5), {"momenta": (0.0, 0.8), "emas": (0.0, 0.9)}, None),
    # two configurations per chunk: the octave pass keeps m or theta~ only where a configuration of its chunk uses
    # them, so parts are widened (and narrowed) to the states of the walk's chunk
    (nqm.OptimizerSetting(precondition_power=0.5), {"momenta": (0.0, 0.8), "emas": (0.0, 0.99)}, 80),
], ids=["momentum", "tuned", "tuned-other-states"])
def test_walks_start_from_the_state_the_octave_pass_hands_over(optimizer, grids, chunk_elements, monkeypatch):
    # with 16 bins or more the octave pass keeps, for each configuration and octave e >= 6 its rows are walked
    # from, v(2^e - 1), N(2^e - 1), M^(2^(e-6)) and A_(2^(e-6)); the walk starts there instead of squaring its way
    # there: the risk it hands over is the step-by-step recurrence's, the powers are M's, and the search finds
    # what it finds without the handover and what the recurrence gives
    rng = np.random.default_rng(31)
    h = np.sort(10 ** rng.uniform(-2.5, 0, 20))[::-1]
    model = nqm.noisy_quadratic_model(h, h * 10 ** rng.uniform(-1, 1, 20))
    rates = 2 * (1 + max(grids.get("momenta", (optimizer.momentum,)))) / h.max() ** (1 - optimizer.precondition_power)
    rates = rates * np.array([0.001, 0.003, 0.01, 0.05, 0.2, 0.5])
    batches, target, horizon = np.array([1.0, 64.0, 4096.0]), 0.005 * model.initial_risk, 4000
    configs = np.array([(a, b, g) for a in rates for b in grids.get("momenta", (optimizer.momentum,))
                        for g in grids.get("emas", (optimizer.ema,))]).T
    system = nqm._first_moment(model, optimizer.precondition_power, *configs)
    handovers = {}
    times, _ = nqm._time_grid(horizon)
    nqm._octave_crossings(system, batches, target, times, handovers=handovers)
    assert len(handovers) >= 3 and max(octave for _, octave in handovers) >= 9
    for (config, octave), part in handovers.items():
        setting = nqm.OptimizerSetting(configs[1, config], optimizer.precondition_power, configs[2, config])
        t, steps = 2**octave - 1, 2 ** (octave - nqm._FIRST_OCTAVE)
        for batch in batches:
            risk = nqm._deterministic(system, part.v)[0] + part.noise[0] / batch
            expected = recurrence_risk(model, setting, lambda step: configs[0, config], batch, t)[t]
            assert risk == pytest.approx(expected, rel=1e-9)
        matrix = np.moveaxis(system.matrix[:, :, config], -1, 0)  # (bins, k, k)
        noise = np.moveaxis(nqm._noise_block(system)[:, :, config], -1, 0)
        power, block = np.broadcast_to(np.eye(matrix.shape[1]), matrix.shape), np.zeros_like(noise)
        for _ in range(steps):
            block, power = block + power @ noise @ power.transpose(0, 2, 1), power @ matrix
        np.testing.assert_allclose(np.moveaxis(part.power[:, :, 0], -1, 0), power, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(np.moveaxis(part.block[:, :, 0], -1, 0), block, rtol=1e-9,
                                   atol=1e-14 * np.abs(block).max())

    walk, kept, handed, widened = nqm._walk_grid, nqm._Handover.kept, [], []
    h_eff = h ** (1 - optimizer.precondition_power)

    def recording(system, *args, handover=None, **kwargs):
        handed.append(handover is not None)
        if handover is not None:  # the risk at 2^e - 1 and, after one step of the walk, 2^(e-6) later
            t, step = 2**handover.octave - 1, 2 ** (handover.octave - nqm._FIRST_OCTAVE)
            for k in range(system.stable.size):
                one = system.subset([k])
                rate = (1 - system.matrix[0, 0, k, 0]) / h_eff[0]  # also the rates near the stability limit
                beta, gamma = (system.matrix[i, i, k, 0] if state in system.states else 0.0
                               for state in (1, 2) for i in [system.states.index(state) if state in system.states
                                                             else 0])
                risks = recurrence_risk(model, nqm.OptimizerSetting(beta, optimizer.precondition_power, gamma),
                                        lambda _: rate, 1.0, t + step)
                v, noise = handover.v[:, [k]], handover.noise[k]
                assert nqm._deterministic(one, v)[0] + noise == pytest.approx(risks[t], rel=1e-9)
                noise = noise + (nqm._quadratic(v, handover.block[:, :, [k]]) @ one.weights)[0]
                v = nqm._advance(v, handover.power[:, :, [k]])
                assert nqm._deterministic(one, v)[0] + noise == pytest.approx(risks[t + step], rel=1e-9)
        return walk(system, *args, handover=handover, **kwargs)

    def widening(part, states):
        widened.append(len(states) - len(part.states))
        return kept(part, states)

    monkeypatch.setattr(nqm, "_walk_grid", recording)
    monkeypatch.setattr(nqm._Handover, "kept", widening)
    if chunk_elements:
        monkeypatch.setattr(nqm, "_CHUNK_ELEMENTS", chunk_elements)
    curve = nqm.steps_vs_batch_size(model, optimizer, batches, learning_rates=rates, target=target, **grids)
    assert any(handed) and np.isfinite(curve.steps).sum() >= 2
    if grids:  # the walk's chunk keeps fewer states than the octave pass's chunk, or (small chunks) more
        assert min(widened) < 0 and (max(widened) > 0) == bool(chunk_elements)
    monkeypatch.setattr(nqm, "_HANDOVER_BYTES", 0)
    handed.clear()
    reference = nqm.steps_vs_batch_size(model, optimizer, batches, learning_rates=rates, target=target, **grids)
    assert not any(handed)
    for name in ("steps", "learning_rates", "momenta", "emas"):
        np.testing.assert_array_equal(getattr(curve, name), getattr(reference, name))
    for j in np.nonzero(np.isfinite(curve.steps))[0]:  # the winner's steps are its exact first crossing
        batch = batches[j]
        chosen = nqm.OptimizerSetting(curve.momenta[j], optimizer.precondition_power, curve.emas[j])
        risks = recurrence_risk(model, chosen, lambda step: curve.learning_rates[j], batch, int(curve.steps[j]) + 1)
        assert curve.steps[j] == first_below(risks, target)


def test_schedule_risk_matches_the_step_by_step_recurrence():
    schedule = nqm.PiecewiseConstantSchedule(learning_rates=(0.9, 0.3, 0.05), boundaries=(10, 40))
    optimizer = nqm.OptimizerSetting(momentum=0.5, precondition_power=0.5, ema=0.5)
    risks = recurrence_risk(SMALL_MODEL, optimizer, lambda step: 0.9 if step < 10 else 0.3 if step < 40 else 0.05,
                            2.0, 120)
    times = np.arange(121)
    np.testing.assert_allclose(nqm.expected_risk(SMALL_MODEL, optimizer, schedule, 2.0, times), risks, rtol=1e-10)


def test_steps_to_target_is_inf_when_steady_state_is_above_target():
    model = nqm.paper_model(dim=100, n_bins=10)
    floor = nqm.steady_state_risk(model, nqm.OptimizerSetting(), 0.5, 1.0)
    steps = nqm.steps_to_target(model, nqm.OptimizerSetting(), [0.5, 5.0], [1.0], target=floor / 2)
    assert np.all(np.isinf(steps))  # 0.5: steady state too high; 5.0: diverges (alpha h_1 > 2)


def test_binned_model_agrees_with_exact_spectrum():
    exact, binned = nqm.paper_model(n_bins=None), nqm.paper_model(n_bins=100)
    assert binned.curvatures.size <= 100 and binned.dim == exact.dim
    assert binned.initial_risk == pytest.approx(exact.initial_risk, rel=1e-12)
    optimizer = nqm.OptimizerSetting(momentum=0.9)
    times = [100, 3000, 100_000]
    np.testing.assert_allclose(nqm.expected_risk(binned, optimizer, 0.05, 64.0, times),
                               nqm.expected_risk(exact, optimizer, 0.05, 64.0, times), rtol=0.01)
    rates, batches = [0.01, 0.2], [4.0, 4096.0]
    np.testing.assert_allclose(nqm.steps_to_target(binned, optimizer, rates, batches),
                               nqm.steps_to_target(exact, optimizer, rates, batches), rtol=0.02)


# ------------------------------------------------------------------------------------------------
# Claims of section 3.7 on the paper's default model (d = 10^4, 100 bins, target 0.01)


@pytest.fixture(scope="module")
def paper():
    return nqm.paper_model()


@pytest.fixture(scope="module")
def curves(paper):
    settings = {
        "sgd": (nqm.OptimizerSetting(), {}),
        "momentum": (nqm.OptimizerSetting(momentum=0.9), {}),
        "p=0.5": (nqm.OptimizerSetting(precondition_power=0.5), {}),
        "p=0.75": (nqm.OptimizerSetting(precondition_power=0.75), {}),
        "p=1": (nqm.OptimizerSetting(precondition_power=1.0), {}),
        "ema": (nqm.OptimizerSetting(), {"emas": TUNED_EMA_GRID}),
    }
    return {name: nqm.steps_vs_batch_size(paper, opt, BATCH_SIZES, **kw) for name, (opt, kw) in settings.items()}


def critical(curve):
    return nqm.critical_batch_size(curve.batch_sizes, curve.steps)


def test_perfect_scaling_at_small_batch(curves):
    for name in ("sgd", "momentum", "p=0.5", "ema"):
        small = slice(0, 4)  # B = 1..8
        slope = np.polyfit(np.log2(BATCH_SIZES[small]), np.log2(curves[name].steps[small]), 1)[0]
        assert slope == pytest.approx(-1.0, abs=0.1), name


def test_momentum_no_benefit_at_small_batch_but_larger_critical_batch(curves):
    sgd, momentum = curves["sgd"], curves["momentum"]
    small = BATCH_SIZES <= 64
    np.testing.assert_allclose(momentum.steps[small], sgd.steps[small], rtol=0.03)
    assert critical(momentum) > 8 * critical(sgd)
    assert momentum.steps[-1] < sgd.steps[-1] / 8
    # small-batch equivalence is in the effective learning rate alpha / (1 - beta)
    np.testing.assert_allclose(momentum.effective_learning_rates[small], sgd.learning_rates[small], rtol=0.25)


def test_preconditioning_power_increases_critical_batch_and_helps_small_batch(curves):
    sizes = [critical(curves[name]) for name in ("sgd", "p=0.5", "p=0.75", "p=1")]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    assert curves["p=0.5"].steps[0] < curves["sgd"].steps[0]  # constant-factor gain even at B = 1


def test_ema_helps_at_small_batch_only_and_lowers_critical_batch(curves):
    sgd, ema = curves["sgd"], curves["ema"]
    assert ema.steps[0] < 0.7 * sgd.steps[0]
    assert ema.steps[-1] == pytest.approx(sgd.steps[-1], rel=0.02)
    assert np.all(ema.steps <= sgd.steps)
    assert critical(ema) < critical(sgd) / 2


def test_optimal_sgd_learning_rate_linear_then_flat(curves, paper):
    sgd = curves["sgd"]
    small = BATCH_SIZES <= 64
    slope = np.polyfit(np.log2(BATCH_SIZES[small]), np.log2(sgd.learning_rates[small]), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)
    large = sgd.learning_rates[BATCH_SIZES >= 2**14]
    assert large.max() / large.min() < 1.25
    assert large.max() < 2.0 / paper.curvatures.max()


def test_no_optimizer_beats_the_lower_bounds(curves, paper):
    bound = nqm.lower_bound_steps(paper, BATCH_SIZES, 0.01)
    for name, curve in curves.items():
        finite = np.isfinite(curve.steps)
        assert np.all(curve.steps[finite] >= bound[finite]), name
        examples = BATCH_SIZES[finite] * curve.steps[finite]
        assert np.all(nqm.bayes_lower_bound_risk(paper, examples) <= 0.01), name
    examples = np.array([1e3, 1e6])
    assert np.all(nqm.bayes_lower_bound_risk(paper, examples) <= paper.dim / (2 * examples))


def scaling_curve(batch_sizes, steps):
    """A hand-made ScalingCurve (hyperparameters unknown: nan)."""
    batch_sizes, steps = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    nan = np.full(batch_sizes.size, np.nan)
    return nqm.ScalingCurve(nqm.OptimizerSetting(), batch_sizes, steps, nan, nan, nan, 0.01,
                            np.zeros(batch_sizes.size, dtype=bool))


def test_mccandlish_fit_recovers_an_exact_curve():
    s_min, b_crit = 37.0, 3000.0
    steps = s_min * (1.0 + b_crit / BATCH_SIZES)
    steps[3] = np.inf  # a batch size that never reached the target is left out of the fit
    fit = nqm.fit_scaling_curve(scaling_curve(BATCH_SIZES, steps), n_bootstrap=20)
    assert fit.b_crit == pytest.approx(b_crit, rel=1e-6)
    assert fit.s_min == pytest.approx(s_min, rel=1e-6)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-6)
    assert fit.log_residual_std < 1e-6


def test_mccandlish_fit_leaves_out_the_batch_sizes_beyond_the_one_step_floor():
    """Perfect scaling down to one step (128 / B, then 1 step from B = 128 on) has no critical batch size; the
    points beyond the floor only show that steps cannot fall below one. The fit took that bend for one (B_crit 170
    [123, 248], resolved, without a word), where critical_batch_size said not resolved."""
    batch_sizes = 2.0 ** np.arange(11)
    steps = np.maximum(128.0 / batch_sizes, 1.0)
    assert nqm.critical_batch_size(batch_sizes, steps) == np.inf
    with pytest.warns(RuntimeWarning, match=r"batch size\(s\) 256, 512, 1024 lie above 128, which reaches the target "
                                            r"in 1 step\(s\), the floor"):
        fit = nqm.fit_scaling_curve(scaling_curve(batch_sizes, steps), n_bootstrap=50, seed=0)
    assert not fit.resolved and fit.b_crit == np.inf
    # a curve that bends well above its floor keeps its fit: the floor's points are left out, the bend is not
    s_min, b_crit = 3.0, 64.0
    bent = np.maximum(np.round(s_min * (1.0 + b_crit / batch_sizes)), 1.0)
    with pytest.warns(RuntimeWarning, match="lie above"):
        fit = nqm.fit_scaling_curve(scaling_curve(batch_sizes, bent), min_steps=3.0, n_bootstrap=50, seed=0)
    assert fit.resolved and fit.b_crit_interval[0] <= b_crit <= fit.b_crit_interval[1]


def test_a_curve_at_the_floor_below_three_batch_sizes_has_no_fit_and_the_cli_says_so(capsys):
    """Leaving out the batch sizes beyond the one-step floor can leave fewer than the fit's 3 points: the fit then
    failed inside fit_tradeoff ('needs at least 3 distinct batch sizes, got 2'), and the nqm command, which fits
    wherever 3 batch sizes reach the target, stopped with that error (p = 1 at d = 30, 1 step from B = 2048 on),
    where before the floor's points were left out it printed a fit. Now the ValueError says why, and the command
    prints no fit, with the reason, and succeeds."""
    batch_sizes = 2.0 ** np.arange(6)
    with pytest.raises(ValueError, match=r"batch size\(s\) 4, 8, 16, 32 lie above 2, which reaches the target in 1 "
                                         r"step\(s\), the floor.*2 batch size\(s\) are left.*needs 3"):
        nqm.fit_scaling_curve(scaling_curve(batch_sizes, [3.0, 1, 1, 1, 1, 1]), n_bootstrap=20)
    nqm.fit_scaling_curve(scaling_curve(batch_sizes, [3.0, 1, 1, 1, 1, 1]), min_steps=0, n_bootstrap=20)
    code = main(["nqm", "--dim", "30", "--bins", "0", "--precondition-power", "1", "--batch-sizes",
                 "1024,2048,4096,8192,16384", "--n-bootstrap", "20", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "critical batch size (steps = 2x perfect linear scaling): inf" in out
    assert "McCandlish fit: none (batch size(s) 4096, 8192, 16384 lie above 2048" in out


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_mccandlish_fit_agrees_with_the_factor_2_critical_batch_size(curves, name):
    curve = curves[name]
    fit = nqm.fit_scaling_curve(curve, n_bootstrap=200)
    assert fit.b_crit_interval[0] <= fit.b_crit <= fit.b_crit_interval[1]
    # Why the bound holds: let r = max_i |log S_i - log S_fit(B_i)| over the sampled points (all finite
    # here). Then B_i S_i = E_fit(B_i) e^(+-r) with E_fit(B) = S_min (B + B_crit) increasing in B, so the
    # data's E_min lies within e^(+-r) of E_fit(B_0) and the ratio B S / E_min of critical_batch_size lies
    # within e^(+-2r) of f(B) = (B + B_crit) / (B_0 + B_crit). The crossing B_2 interpolates that ratio
    # linearly in log-log between two grid points one octave apart (BATCH_SIZES are powers of 2, all
    # finite and above the one-step floor here); log f is convex in log B with second derivative <= 1/4,
    # so the chord exceeds log f by at most gap = (1/4) (log 2)^2 / 8. Hence
    # 2 e^(-2r - gap) <= f(B_2) <= 2 e^(2r), which brackets B_2 since f is increasing.
    # The McCandlish form describes these curves to r < 0.25, so the bracket is informative: within
    # [0.19, 2.3] B_crit at worst; for the actual r = 0.16 (SGD and momentum) it is [0.42, 1.78] B_crit,
    # and the factor-2 critical batch sizes sit at 1.41 and 1.32 B_crit.
    residuals = np.log(curve.steps) - np.log(fit.s_min * (1.0 + fit.b_crit / curve.batch_sizes))
    r = np.max(np.abs(residuals))
    assert r < 0.25, r
    gap = np.log(2.0) ** 2 / 32
    b0 = curve.batch_sizes.min()
    low = 2.0 * np.exp(-2 * r - gap) * (b0 + fit.b_crit) - fit.b_crit
    high = 2.0 * np.exp(2 * r) * (b0 + fit.b_crit) - fit.b_crit
    assert low <= critical(curve) <= high, (low, critical(curve), high, fit.b_crit)


def test_a_best_learning_rate_at_the_largest_stable_rate_searched_is_at_the_grid_edge():
    # at large batch the best SGD rate sits just below the stability limit 2 / h_max = 2: with the default grid it
    # was the largest stable rate searched, (1 - 2^-6) 2, and the flag read False (it compared with the largest
    # rate of the grid, 8, which diverges); rates closer to the limit do better, so the optimum lay outside
    model, sgd = nqm.paper_model(dim=1000, n_bins=20), nqm.OptimizerSetting()
    curve = nqm.steps_vs_batch_size(model, sgd, [1.0, 2.0**20])
    assert curve.learning_rates[1] == pytest.approx(2.0 * (1.0 - 2.0**-6), rel=1e-12)
    assert curve.learning_rate_at_grid_edge.tolist() == [False, True]
    closer = 2.0 * (1.0 - np.geomspace(2.0**-7, 2.0**-14, 8))
    wider = nqm.steps_vs_batch_size(model, sgd, [1.0, 2.0**20],
                                    learning_rates=np.r_[nqm.DEFAULT_LEARNING_RATES, closer])
    assert wider.steps[1] < curve.steps[1] and curve.learning_rates[1] < wider.learning_rates[1] < closer.max()
    assert wider.learning_rate_at_grid_edge.tolist() == [False, False]
    # the smallest and the largest rate of a grid that is stable throughout are edges, as before
    for grid, best in (([0.003, 0.006], 0.003), ([0.002, 0.004], 0.004)):
        small_batch = nqm.steps_vs_batch_size(model, sgd, [1.0], learning_rates=grid)
        assert small_batch.learning_rates[0] == best and small_batch.learning_rate_at_grid_edge[0]


def test_critical_batch_size_of_the_mccandlish_form():
    # S = S_min (1 + B_crit / B) sampled from B_0 up: B S / E_min = (B + B_crit) / (B_0 + B_crit) = 2 exactly
    # at B = B_crit + 2 B_0, here a sampled batch size, so no interpolation error.
    s_min, b_crit, b0 = 0.5, 1000.0, 1.0
    batch_sizes = np.array([1.0, 10.0, 100.0, 500.0, 1002.0, 2000.0, 10_000.0])
    steps = s_min * (1.0 + b_crit / batch_sizes)
    assert nqm.critical_batch_size(batch_sizes, steps, min_steps=0) == pytest.approx(b_crit + 2 * b0, rel=1e-9)
    # with the default one-step floor, S < 1 at B >= 1002 would hide the crossing
    assert nqm.critical_batch_size(batch_sizes, steps) == np.inf


def test_critical_batch_size_is_not_an_artifact_of_the_one_step_floor():
    batch_sizes = 2.0 ** np.arange(10)
    # perfect scaling down to one step at B = 2^7; at 2^8 and 2^9 one step is still the least possible, so
    # B S = 2 and 4 E_min there without any departure from linear scaling: unresolved, not 2^8
    perfect = [128, 64, 32, 16, 8, 4, 2, 1, 1, 1]
    assert nqm.critical_batch_size(batch_sizes, perfect) == np.inf
    assert nqm.critical_batch_size(batch_sizes, perfect, min_steps=0) == pytest.approx(256.0)  # the artifact
    # the shape of the NQM p = 1 curve: E_min is reached at the first one-step point (B = 2^7 here)
    preconditioned = [600, 300, 160, 74, 37, 18, 10, 1, 1, 1]
    assert nqm.critical_batch_size(batch_sizes, preconditioned) == np.inf
    # sparse sampling: the factor-2 point is the first one-step point itself, which cannot show a bend
    assert nqm.critical_batch_size([1.0, 8.0], [4.0, 1.0]) == np.inf
    assert nqm.critical_batch_size([1.0, 8.0], [4.0, 1.0], min_steps=0) == pytest.approx(8.0)
    # a bend resolved above the floor is kept: B S = 64, 64, 80, 128 (= 2 E_min at B = 8), ..., then one step
    bent = [64, 32, 20, 16, 12, 4, 1]
    assert nqm.critical_batch_size(batch_sizes[:7], bent) == pytest.approx(8.0)
    assert nqm.critical_batch_size(batch_sizes[:7], bent, min_steps=0) == pytest.approx(8.0)
    # an unsorted curve with an unreached batch size gives the same answer
    order = np.array([6, 2, 0, 5, 1, 4, 3])
    assert nqm.critical_batch_size(np.r_[batch_sizes[:7][order], 2.0**10],
                                   np.r_[np.array(bent, float)[order], np.inf]) == pytest.approx(8.0)


def test_critical_batch_size_of_the_nqm_p1_curve_is_unresolved(curves):
    p1 = curves["p=1"]
    first_one_step = p1.batch_sizes[np.argmax(p1.steps == 1)]
    assert p1.steps.min() == 1 and first_one_step < p1.batch_sizes.max()
    assert critical(p1) == np.inf
    # without the floor handling, the answer would be twice the first one-step batch size: the artifact
    assert nqm.critical_batch_size(p1.batch_sizes, p1.steps, min_steps=0) == pytest.approx(2 * first_one_step)


# ------------------------------------------------------------------------------------------------
# Validation and CLI


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="momentum"):
        nqm.OptimizerSetting(momentum=1.0)
    with pytest.raises(ValueError, match="precondition_power"):
        nqm.OptimizerSetting(precondition_power=-0.1)
    with pytest.raises(ValueError, match="diverge"):
        nqm.expected_risk(SMALL_MODEL, nqm.OptimizerSetting(), 2.5, 1.0, [1])
    with pytest.raises(ValueError, match="curvatures"):
        nqm.noisy_quadratic_model([1.0, -1.0])
    with pytest.raises(ValueError, match="boundaries"):
        nqm.PiecewiseConstantSchedule((0.1, 0.2), (5, 6))
    with pytest.raises(TypeError, match="OptimizerSetting"):
        nqm.expected_risk(SMALL_MODEL, "sgd", 0.1, 1.0, [1])
    with pytest.raises(ValueError, match="steps"):
        nqm.expected_risk(SMALL_MODEL, nqm.OptimizerSetting(), 0.1, 1.0, [1.5])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: nqm.paper_model(dim=0), ValueError, "dim must be >= 1"),
        (lambda: nqm.paper_model(dim=10.0), TypeError, "dim must be an int"),
        (lambda: nqm.paper_model(dim=10, n_bins=0), ValueError, "n_bins must be >= 1"),
        (lambda: nqm.paper_model(dim=10, n_bins=True), TypeError, "n_bins must be an int"),
        (lambda: nqm.noisy_quadratic_model([1.0, 0.5], n_bins=2.5), TypeError, "n_bins must be an int"),
        (lambda: nqm.steps_to_target(SMALL_MODEL, nqm.OptimizerSetting(), 0.1, 1.0, max_steps=0), ValueError,
         "max_steps must be >= 1"),
        (lambda: nqm.steps_to_target(SMALL_MODEL, nqm.OptimizerSetting(), 0.1, 1.0, max_steps=2**51), ValueError,
         "max_steps must be <= 2"),
        (lambda: nqm.steps_to_target(SMALL_MODEL, nqm.OptimizerSetting(), 0.1, 1.0, max_steps=1e6), TypeError,
         "max_steps must be an int"),
        (lambda: nqm.steps_vs_batch_size(SMALL_MODEL, nqm.OptimizerSetting(), [1.0], target=0.0), ValueError,
         "target"),
        (lambda: nqm.lower_bound_steps(SMALL_MODEL, [1.0], target=-1.0), ValueError, "target"),
        (lambda: nqm.critical_batch_size([1.0, 2.0], [2.0, 1.5], min_steps=-1), ValueError, "min_steps"),
    ],
)
def test_integer_and_target_arguments_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_numpy_integers_are_accepted():
    model = nqm.paper_model(dim=np.int64(20), n_bins=np.int32(5))
    assert model.dim == 20 and model.curvatures.size <= 5
    steps = nqm.steps_to_target(model, nqm.OptimizerSetting(), 0.5, 4.0, target=0.5, max_steps=np.int64(1000))
    assert np.isfinite(steps).all()


def test_cli_prints_steps_and_critical_batch(capsys, paper):
    code = main(["nqm", "--optimizer", "momentum", "--momentum", "0.9", "--batch-sizes", "1,16,256,4096,65536",
                 "--no-progress", "--n-bootstrap", "50"])
    assert code == 0
    out = capsys.readouterr().out
    curve = nqm.steps_vs_batch_size(paper, nqm.OptimizerSetting(momentum=0.9), [1.0, 16.0, 256.0, 4096.0, 65536.0])
    for steps in curve.steps:
        assert f"{int(steps)}" in out
    assert "critical batch size" in out
    expected = nqm.critical_batch_size(curve.batch_sizes, curve.steps)
    assert f"{expected:.4g}" in out


def test_batch_sizes_that_never_reached_the_target_are_named_with_what_leaving_them_out_does(capsys):
    """A new user's NQM run with --max-steps 100: B = 1 .. 8 never reached the target and were dropped without a
    word, the critical batch size 113 instead of 92.19 (E_min then comes from B = 16)."""
    batch_sizes = 2.0 ** np.arange(8)
    steps = 50.0 * (1.0 + 16.0 / batch_sizes)
    full = nqm.critical_batch_size(batch_sizes, steps)
    censored = np.where(batch_sizes < 4, np.inf, steps)
    with pytest.warns(RuntimeWarning, match=r"batch size\(s\) 1, 2 never reached the target .* rests on the other 6\. "
                                            r"They are smaller than every batch size that reached it \(from 4\): "
                                            r"E_min .* can only be overstated"):
        partial = nqm.critical_batch_size(batch_sizes, censored)
    assert partial > full
    with pytest.warns(RuntimeWarning, match=r"batch size\(s\) 1, 2 never reached .* extrapolates there"):
        nqm.fit_scaling_curve(scaling_curve(batch_sizes, censored), n_bootstrap=20)
    middle = np.where(batch_sizes == 8, np.inf, steps)
    with pytest.warns(RuntimeWarning, match=r"batch size\(s\) 8 never reached the target") as caught:
        nqm.critical_batch_size(batch_sizes, middle)
    assert "smaller than every" not in str(caught[0].message)

    code = main(["nqm", "--dim", "30", "--bins", "0", "--target", "0.05", "--batch-sizes", "1,2,4,8,16,32,64,128",
                 "--max-steps", "100", "--n-bootstrap", "20", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("note: batch size(s) 1, 2, 4, 8 never reached the target") == 2
