"""Batch-size policies, Smith schedules and learning-rate coupling against independent references."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from noisescale.controller import (
    SCHEDULE_MODES,
    BatchSizeSchedule,
    NoiseScaleBatchPolicy,
    adascale_gain,
    couple_learning_rate,
)

NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------- noise-scale policy


def reference_policy_run(noise_scales, *, initial, b_min, b_max, kappa, granularity, hold, factor, allow_decrease,
                         held=0):
    """Brute force over the grid of allowed batch sizes, one step at a time, from the rules as stated; ``held``:
    the steps already taken at ``initial``."""
    batch, steps_at_batch, chosen = initial, held, []
    for noise_scale in noise_scales:
        steps_at_batch += 1
        if math.isfinite(noise_scale) and noise_scale > 0 and steps_at_batch >= hold:
            desired = kappa * noise_scale
            grid = [
                c
                for c in range(granularity, b_max + 1, granularity)
                if b_min <= c <= b_max and batch / factor - 1e-9 <= c <= batch * factor + 1e-9
            ]
            best = min(grid, key=lambda c: (abs(c - desired), -c))  # nearest, ties upwards
            if best > batch or (best < batch and allow_decrease):
                batch, steps_at_batch = best, 0
        chosen.append(batch)
    return chosen


POLICY_CONFIGS = [
    dict(initial=32, b_min=16, b_max=1024, kappa=1.0, granularity=16, hold=1, factor=2.0, allow_decrease=False),
    dict(initial=64, b_min=16, b_max=512, kappa=0.5, granularity=8, hold=3, factor=1.5, allow_decrease=True),
    dict(initial=10, b_min=10, b_max=300, kappa=2.0, granularity=1, hold=5, factor=1.1, allow_decrease=True),
    dict(initial=12, b_min=4, b_max=96, kappa=1.0, granularity=4, hold=2, factor=4.0, allow_decrease=False),
]


@pytest.mark.parametrize("config", POLICY_CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_matches_brute_force_reference_step_by_step(config, seed):
    rng = np.random.default_rng(seed)
    noise_scales = list(np.exp(rng.uniform(np.log(2), np.log(3000), size=300)))
    for position in rng.choice(300, size=30, replace=False):  # early/unresolved estimates
        noise_scales[position] = [NAN, INF, -INF, -5.0, 0.0][position % 5]
    policy = NoiseScaleBatchPolicy(
        config["initial"],
        min_batch_size=config["b_min"],
        max_batch_size=config["b_max"],
        kappa=config["kappa"],
        granularity=config["granularity"],
        hold_steps=config["hold"],
        max_factor=config["factor"],
        allow_decrease=config["allow_decrease"],
    )
    chosen = [policy.step(float(x)) for x in noise_scales]
    assert chosen == reference_policy_run(noise_scales, **config)
    assert len(set(chosen)) >= 3  # the run actually moved


def test_policy_rules_by_hand():
    policy = NoiseScaleBatchPolicy(32, min_batch_size=16, max_batch_size=256, granularity=16, hold_steps=2, max_factor=2.0)
    assert policy.step(NAN) == 32  # step 1: no estimate yet
    assert policy.step(INF) == 32  # step 2: held although allowed, estimate unresolved
    assert policy.step(1e6) == 64  # at most a factor 2 per change
    assert policy.step(1e6) == 64  # hold period: one step at 64 so far
    assert policy.step(1e6) == 128
    assert policy.step(1e6) == 128
    assert policy.step(1e6) == 256
    assert policy.step(1e6) == 256
    assert policy.step(1e6) == 256  # clipped at B_max
    assert policy.step(20.0) == 256  # increase-only by default
    assert policy.step(200.0) == 256  # nearest multiple of 16 to 200 is 208, a decrease: ignored


def test_policy_rounds_to_nearest_multiple_and_clips_below():
    policy = NoiseScaleBatchPolicy(64, min_batch_size=32, max_batch_size=512, granularity=32, max_factor=4.0, allow_decrease=True)
    assert policy.step(110.0) == 96  # 110 -> 3 * 32 (nearest)
    assert policy.step(113.0) == 128  # 113 -> 4 * 32
    assert policy.step(1.0) == 32  # clipped at B_min (and within 128 / 4)
    assert policy.step(80.0) == 96  # 80 = 2.5 * 32: halves round up


def test_policy_state_dict_round_trip_continues_identically():
    noise_scales = list(np.exp(np.random.default_rng(4).uniform(0, 7, size=80)))
    make = lambda: NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=800, granularity=8, hold_steps=4, allow_decrease=True)
    uninterrupted = make()
    expected = [uninterrupted.step(x) for x in noise_scales]
    first = make()
    head = [first.step(x) for x in noise_scales[:37]]
    checkpoint = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(checkpoint)
    assert head + [resumed.step(x) for x in noise_scales[37:]] == expected
    other = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=800, granularity=8, hold_steps=5)
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(checkpoint)


@pytest.mark.parametrize("granularity, continued", [(2, 86), (4, 84), (8, 88), (40, 80)])
def test_policy_state_continues_at_another_granularity_rounded_to_it(granularity, continued):
    """A run resumed on another number of processes: the policy's batch size (85, saved at granularity 1) continues
    at the nearest multiple of the new granularity (inside [B_min, B_max], which are multiples of it), with a
    warning naming both, keeps its hold counter, and then follows the reference decision rule on the new grid;
    another setting is still refused."""
    saved = NoiseScaleBatchPolicy(85, min_batch_size=40, max_batch_size=400, hold_steps=3)
    saved.step(90.0)
    checkpoint = json.loads(json.dumps(saved.state_dict()))
    make = lambda **changed: NoiseScaleBatchPolicy(
        200, **{"min_batch_size": 40, "max_batch_size": 400, "hold_steps": 3, "granularity": granularity, **changed})
    resumed = make()
    with pytest.warns(UserWarning, match=f"granularity 1 and continues at granularity {granularity}.*85 becomes "
                                         f"{continued}"):
        resumed.load_state_dict(checkpoint)
    assert resumed.batch_size == continued and resumed.state.steps_since_change == 1
    noise_scales = [90.0, 150.0, 300.0, 120.0, 700.0]
    expected = reference_policy_run(noise_scales, initial=continued, b_min=40, b_max=400, kappa=1.0,
                                    granularity=granularity, hold=3, factor=2.0, allow_decrease=False, held=1)
    assert [resumed.step(x) for x in noise_scales] == expected
    with pytest.raises(ValueError, match="config"):
        make(kappa=2.0).load_state_dict(checkpoint)


def test_policy_state_of_an_odd_minimum_continues_at_a_granularity_it_rounds_to():
    """A run started at B_min = 9 on one process, resumed on two (a new user's find: no --batch-size was accepted,
    9 by the command and 10 by the policy): B_min and B_max are compared rounded to the new granularity, so 10 is
    the run's B_min there and 8 is another run's, named in the error; back on one process B_min is 10."""
    saved = NoiseScaleBatchPolicy(9, min_batch_size=9, max_batch_size=63, hold_steps=2)
    saved.step(100.0), saved.step(100.0)
    checkpoint = json.loads(json.dumps(saved.state_dict()))
    assert checkpoint["batch_size"] == 18
    resumed = NoiseScaleBatchPolicy(10, min_batch_size=10, max_batch_size=64, granularity=2, hold_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 18 is a multiple of 2: no warning
        resumed.load_state_dict(checkpoint)
    assert resumed.batch_size == 18 and resumed.state.steps_since_change == 0
    other = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=64, granularity=2, hold_steps=2)
    with pytest.raises(ValueError, match=r"min_batch_size differs \(B_min and B_max rounded to this granularity\)"):
        other.load_state_dict(checkpoint)
    back = NoiseScaleBatchPolicy(10, min_batch_size=10, max_batch_size=64, hold_steps=2)
    back.load_state_dict(resumed.state_dict())
    assert back.batch_size == 18
    with pytest.raises(ValueError, match="min_batch_size differs"):
        NoiseScaleBatchPolicy(9, min_batch_size=9, max_batch_size=64, hold_steps=2).load_state_dict(
            resumed.state_dict())


def test_policy_decide_is_pure():
    policy = NoiseScaleBatchPolicy(16, min_batch_size=16, max_batch_size=64)
    state = policy.state
    assert policy.decide(state, 40.0).batch_size == 32
    assert policy.state == state and policy.batch_size == 16


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(min_batch_size=64, max_batch_size=32), ValueError, "min_batch_size=64 exceeds max_batch_size=32"),
        (dict(kappa=0.0), ValueError, "kappa must be a finite number > 0"),
        (dict(kappa=-1.0), ValueError, "kappa"),
        (dict(granularity=3), ValueError, "not a multiple of granularity=3"),
        (dict(max_factor=1.0), ValueError, "max_factor must be > 1"),
        (dict(max_factor=1.01), ValueError, "cannot move min_batch_size"),
        (dict(hold_steps=0), ValueError, "hold_steps must be >= 1"),
        (dict(min_batch_size=16.0), TypeError, "min_batch_size must be an int"),
        (dict(min_batch_size=64, max_batch_size=128), ValueError, "initial_batch_size=32 lies outside"),
    ],
)
def test_policy_rejects_bad_arguments(kwargs, error, message):
    arguments = dict(min_batch_size=16, max_batch_size=256) | kwargs
    with pytest.raises(error, match=message):
        NoiseScaleBatchPolicy(32, **arguments)


# --------------------------------------------------------------------------- Smith schedules


def lr_decay_reference(epoch, base_lr, milestones, factor):
    """eps of the plain step decay, counted milestone by milestone."""
    lr = base_lr
    for milestone in milestones:
        if epoch >= milestone:
            lr *= factor
    return lr


EPOCHS = [0.0, 0.5, 29.999, 30.0, 45.2, 60.0, 79.9, 80.0, 85.0, 90.0, 200.0]
MILESTONES = [30, 60, 80, 90]


@pytest.mark.parametrize("factor", [0.1, 0.2])
def test_batch_increase_keeps_g_equal_to_lr_decay_until_cap_then_decays_lr(factor):
    base_lr, base_batch, cap = 0.1, 128, 128 * 400
    smith = BatchSizeSchedule("batch-increase", base_learning_rate=base_lr, base_batch_size=base_batch,
                              milestones=MILESTONES, decay_factor=factor, max_batch_size=cap)
    decay = BatchSizeSchedule("lr-decay", base_learning_rate=base_lr, base_batch_size=base_batch,
                              milestones=MILESTONES, decay_factor=factor)
    for epoch in EPOCHS:
        batch, lr = smith(epoch)
        ref_lr = lr_decay_reference(epoch, base_lr, MILESTONES, factor)
        assert decay(epoch) == (base_batch, pytest.approx(ref_lr, rel=1e-12))
        assert lr / batch == pytest.approx(ref_lr / base_batch, rel=1e-12)  # the paper's equivalence
        uncapped = base_batch * base_lr / ref_lr
        if uncapped <= cap:
            assert batch == round(uncapped) and lr == pytest.approx(base_lr, rel=1e-12)
        else:  # B_max reached: the rest of the factor goes to the learning rate
            assert batch == cap and lr == pytest.approx(base_lr * cap / uncapped, rel=1e-12)
    # both regimes were exercised
    assert smith(31)[0] < cap and smith(200)[0] == cap and smith(200)[1] < base_lr


def test_hybrid_splits_each_factor_as_sqrt_like_the_mnist_replication():
    base_lr, base_batch, factor = 0.1, 100, 0.2
    hybrid = BatchSizeSchedule("hybrid", base_learning_rate=base_lr, base_batch_size=base_batch,
                               milestones=[3, 6, 9], decay_factor=factor)
    for stage, epoch in enumerate([0, 3, 6, 9]):
        batch, lr = hybrid(epoch + 0.5)
        assert batch == round(base_batch * math.sqrt(5) ** stage)  # 100, 224, 500, 1118
        assert lr / batch == pytest.approx(base_lr * factor**stage / base_batch, rel=1e-12)
        assert lr == pytest.approx(base_lr / math.sqrt(5) ** stage, rel=2e-3)  # up to the rounding of B
    uneven = BatchSizeSchedule("hybrid", base_learning_rate=1.0, base_batch_size=64, milestones=[1],
                               decay_factor=1 / 8, batch_share=2 / 3)
    assert uneven(1.0) == (256, pytest.approx(0.5))


def test_fixed_ignores_milestones():
    fixed = BatchSizeSchedule("fixed", base_learning_rate=0.05, base_batch_size=32, milestones=MILESTONES)
    assert {fixed(epoch) for epoch in EPOCHS} == {(32, 0.05)}


def test_momentum_rule_keeps_eps_over_b_one_minus_m_constant():
    base = dict(base_learning_rate=0.1, base_batch_size=100, milestones=[10, 20], decay_factor=0.1,
                momentum_rule=True, base_momentum=0.9)
    for mode in SCHEDULE_MODES:
        schedule = BatchSizeSchedule(mode, **base, **({"max_batch_size": 20000} if mode != "fixed" else {}))
        for epoch in [0.0, 12.0, 25.0]:
            reference = schedule(epoch)
            for momentum in [0.0, 0.5, 0.95, 0.98]:
                batch, lr = schedule(epoch, momentum=momentum)
                assert lr / (batch * (1 - momentum)) == pytest.approx(
                    reference.learning_rate / (reference.batch_size * (1 - 0.9)), rel=1e-12
                )
    increase = BatchSizeSchedule("batch-increase", **base)
    assert increase(0.0, momentum=0.98) == (500, pytest.approx(0.1))  # B scales by (1 - 0.9)/(1 - 0.98) = 5
    with pytest.raises(ValueError, match="momentum_rule=False"):
        BatchSizeSchedule("lr-decay", base_learning_rate=0.1, base_batch_size=8)(1.0, momentum=0.9)


def test_schedule_granularity_and_state_dict_round_trip():
    schedule = BatchSizeSchedule("hybrid", base_learning_rate=0.1, base_batch_size=64, milestones=[1.5, 3.0],
                                 decay_factor=0.2, granularity=32, max_batch_size=320)
    assert [schedule(e).batch_size for e in (0, 1.5, 3.0)] == [64, 128, 320]  # 143.1 -> 128, 320 -> 320
    checkpoint = json.loads(json.dumps(schedule.state_dict()))
    restored = BatchSizeSchedule("fixed", base_learning_rate=1.0, base_batch_size=1)
    restored.load_state_dict(checkpoint)
    assert restored.state_dict() == schedule.state_dict()
    assert [restored(e) for e in EPOCHS] == [schedule(e) for e in EPOCHS]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="cosine"), "mode must be one of"),
        (dict(milestones=[30, 30, 80]), "strictly increasing"),
        (dict(milestones=[60, 30]), "strictly increasing"),
        (dict(decay_factor=1.0), "decay_factor must lie in \\(0, 1\\)"),
        (dict(decay_factor=5.0), "decay_factor"),
        (dict(max_batch_size=64), "max_batch_size=64 is below base_batch_size=128"),
        (dict(base_learning_rate=0.0), "base_learning_rate must be a finite number > 0"),
        (dict(mode="batch-increase", batch_share=0.5), "batch_share applies to mode 'hybrid' only"),
        (dict(mode="hybrid", batch_share=1.0), "batch_share must lie in \\(0, 1\\)"),
        (dict(base_momentum=1.0), "base_momentum must lie in \\[0, 1\\)"),
        (dict(granularity=96), "base_batch_size=128 is not a multiple of granularity=96"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    arguments = dict(mode="lr-decay", base_learning_rate=0.1, base_batch_size=128, milestones=[30, 60]) | kwargs
    mode = arguments.pop("mode")
    with pytest.raises(ValueError, match=message):
        BatchSizeSchedule(mode, **arguments)
    with pytest.raises(ValueError, match="epoch must be a finite number >= 0"):
        BatchSizeSchedule("fixed", base_learning_rate=0.1, base_batch_size=8)(-1.0)


# --------------------------------------------------------------------------- learning-rate coupling


def test_adascale_gain_closed_form_and_limits():
    rng = np.random.default_rng(0)
    for variance, grad_sqnorm, scale in rng.uniform(0.01, 10.0, size=(20, 3)):
        expected = (variance + grad_sqnorm) / (variance / scale + grad_sqnorm)
        assert adascale_gain(variance, grad_sqnorm, scale) == pytest.approx(expected, rel=1e-14)
        assert adascale_gain(variance, grad_sqnorm, 1.0) == pytest.approx(1.0, rel=1e-14)
        assert 1.0 <= adascale_gain(variance, grad_sqnorm, 1 + scale) <= 1 + scale
    assert adascale_gain(1e12, 1.0, 8.0) == pytest.approx(8.0, rel=1e-9)  # sigma^2 dominates: r -> S
    assert adascale_gain(1.0, 1e12, 8.0) == pytest.approx(1.0, rel=1e-9)  # mu^2 dominates: r -> 1
    assert adascale_gain(-3.0, 2.0, 8.0) == 1.0  # negative variance estimate clipped to 0
    with pytest.raises(ValueError, match="grad_sqnorm must be finite"):
        adascale_gain(1.0, math.nan, 2.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        adascale_gain(1.0, 1.0, 0.0)


def test_couple_learning_rate_rules():
    assert couple_learning_rate(0.1, 64, 256, "none") == 0.1
    assert couple_learning_rate(0.1, 64, 256, "linear") == pytest.approx(0.4)
    assert couple_learning_rate(0.1, 64, 256, "sqrt") == pytest.approx(0.2)
    # AdaScale over the old batch: sigma^2 = tr(Sigma)/B_old, S = B_new/B_old; with B_simple = tr/|G|^2 = 1000
    trace_sigma, grad_sqnorm = 2000.0, 2.0
    expected = 0.1 * (1000 / 64 + 1) / (1000 / 256 + 1)
    lr = couple_learning_rate(0.1, 64, 256, "adascale", trace_sigma=trace_sigma, grad_sqnorm=grad_sqnorm)
    assert lr == pytest.approx(expected, rel=1e-14)
    assert 0.1 < lr < couple_learning_rate(0.1, 64, 256, "linear")
    # gains compose: 64 -> 100 -> 256 equals 64 -> 256
    step = couple_learning_rate(0.1, 64, 100, "adascale", trace_sigma=trace_sigma, grad_sqnorm=grad_sqnorm)
    assert couple_learning_rate(step, 100, 256, "adascale", trace_sigma=trace_sigma, grad_sqnorm=grad_sqnorm) == pytest.approx(lr, rel=1e-13)
    with pytest.raises(ValueError, match="needs trace_sigma and grad_sqnorm"):
        couple_learning_rate(0.1, 64, 256, "adascale")
    with pytest.raises(ValueError, match="rule must be one of"):
        couple_learning_rate(0.1, 64, 256, "quadratic")
