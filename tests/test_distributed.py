"""Tests for noisescale.distributed: 3 gloo processes on CPU against a single-process float64 reference.

One spawn of 3 ranks (module fixture) runs every distributed scenario and saves its results with torch.save;
the tests compare them with references computed here in one process from the same data. Each rank runs torch in
one thread (3 ranks share the cores with this process), and the fixture fails only when the ranks make no
progress for ``NOISESCALE_TEST_HANG_S`` seconds (tests/conftest.py): a busy machine makes it slower, not red.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from _ranks import capture_error, file_rendezvous, one_rank_process_group, report_progress, spawn_ranks
from noisescale.controller import NoiseScaleBatchPolicy
from noisescale.distributed import (
    DDPNoiseScale,
    all_reduce_per_example_sums,
    combine_per_example_sums,
    mean_allreduce_hook,
)
from noisescale.estimators import simple_noise_scale, two_batch_noise_scale
from noisescale.hessian import hessian_noise_scale
from noisescale.integrations.observer import NoiseScaleOptions, ObservingNoiseScaleMonitor
from noisescale.losses import per_example_cross_entropy
from noisescale.monitor import NoiseScaleMonitor
from noisescale.sampler import ResizableBatchSampler
from noisescale.training import AdaptiveTrainer

WORLD_SIZE = 3  # not a power of two: DDP scales by 1/R, which is not exact then
MICRO_BATCH = 4
ACCUMULATION_STEPS = 2
LOCAL_BATCH = MICRO_BATCH * ACCUMULATION_STEPS
STEPS = 3
LEARNING_RATE = 0.1
NAN_STEP, NAN_RANK = 1, 1
TRAINER_STEPS, NAN_EXAMPLE = 8, 40
HESSIAN_STEPS, HESSIAN_SEED = 2, 7
INPUTS, HIDDEN, CLASSES = 6, 8, 3
POPULATION = 5   # DDPNoiseScale(population_size=...): every draw of WORLD_SIZE examples, 60


def _make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    ).to(dtype)


def _make_batch_norm_model() -> torch.nn.Module:
    """BatchNorm in train mode: measured from the micro-batches (each normalised by its own statistics)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(INPUTS, HIDDEN), torch.nn.BatchNorm1d(HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, CLASSES)).double()


def _make_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (STEPS, WORLD_SIZE, LOCAL_BATCH, INPUTS) and labels: step s, rank r holds [s, r]."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, WORLD_SIZE, LOCAL_BATCH, INPUTS, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (STEPS, WORLD_SIZE, LOCAL_BATCH), generator=generator)
    return inputs.to(dtype), labels


def _ddp(model: torch.nn.Module, **options) -> DistributedDataParallel:
    return DistributedDataParallel(model, bucket_cap_mb=1e-4, **options)  # tiny buckets: several per backward


def _accumulated_backward(model: DistributedDataParallel, inputs: torch.Tensor, labels: torch.Tensor,
                          observer=None) -> None:
    """ACCUMULATION_STEPS micro-batches, no_sync() for all but the last, each loss divided by the count; each
    observed by ``observer`` (an ObservingNoiseScaleMonitor, docs/own-loop.md), if given."""
    for k in range(ACCUMULATION_STEPS):
        part = slice(k * MICRO_BATCH, (k + 1) * MICRO_BATCH)
        with model.no_sync() if k < ACCUMULATION_STEPS - 1 else contextlib.nullcontext():
            if observer is not None:
                observer.begin_micro_batch(MICRO_BATCH, batch=(inputs[part], labels[part]))
            loss = F.cross_entropy(model(inputs[part]), labels[part]) / ACCUMULATION_STEPS
            loss.backward()
            if observer is not None:
                observer.end_micro_batch(loss)


def _train(model, noise, inputs, labels, rank, *, momentum=0.0, poison=None):
    """STEPS steps of SGD; ``poison=(step, rank)`` feeds NaN inputs to that rank at that step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=momentum)
    for step in range(STEPS):
        step_inputs = inputs[step, rank]
        if poison == (step, rank):
            step_inputs = step_inputs * math.nan
        _accumulated_backward(model, step_inputs, labels[step, rank])
        estimate = noise.step_estimate() if noise is not None else None
        if estimate is None or math.isfinite(estimate.grad_sqnorm):
            optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _population_data() -> tuple[torch.Tensor, torch.Tensor]:
    """POPULATION labelled examples, the dataset of DDPNoiseScale's finite-population correction."""
    generator = torch.Generator().manual_seed(6)
    return (torch.randn(POPULATION, INPUTS, generator=generator, dtype=torch.float64),
            torch.randint(0, CLASSES, (POPULATION,), generator=generator))


def _trainer_data(poison: bool = False) -> TensorDataset:
    """96 labelled examples; ``poison`` makes one input NaN (whichever rank's shard holds it, at whatever step)."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(96, INPUTS, generator=generator, dtype=torch.float64)
    if poison:
        inputs[NAN_EXAMPLE, 0] = math.nan
    return TensorDataset(inputs, torch.randint(0, CLASSES, (96,), generator=generator))


def _adaptive_trainer(model: torch.nn.Module, dataset: TensorDataset, kappa: float = 4.0,
                      lr_coupling: str = "sqrt") -> AdaptiveTrainer:
    """B follows kappa B_simple from 12 up to 48 in multiples of 6 (= 3 ranks x 2), micro-batches of 2 per process."""
    policy = NoiseScaleBatchPolicy(12, min_batch_size=12, max_batch_size=48, kappa=kappa, granularity=6, hold_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    return AdaptiveTrainer(model, per_example_cross_entropy, optimizer, dataset, policy=policy, max_micro_batch=2,
                           lr_coupling=lr_coupling, monitor_options={"ema_decay": 0.5}, seed=4, progress=False)


@contextlib.contextmanager
def _counting_all_reduces(counter: list[int]):
    """Count the all-reduces made in this process: every one, dist.all_reduce's and the hooks' (which ask the
    process group directly), ends in ProcessGroup.allreduce."""
    descriptor = vars(dist.ProcessGroup)["allreduce"]  # restored as it was: the looked-up function does not bind
    original = dist.ProcessGroup.allreduce

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    dist.ProcessGroup.allreduce = counted
    try:
        yield counter
    finally:
        dist.ProcessGroup.allreduce = descriptor


def _hessian_trainer(model: torch.nn.Module) -> AdaptiveTrainer:
    """A fixed global batch of 12 (4 per rank, one micro-batch), the Hessian proxies at every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    options = {"hessian_every": 1, "hessian_examples": MICRO_BATCH, "hessian_probes": 4, "seed": HESSIAN_SEED}
    return AdaptiveTrainer(model, per_example_cross_entropy, optimizer, _trainer_data(), batch_size=WORLD_SIZE * 4,
                           monitor_options=options, seed=4, progress=False)


def _worker(rank: int, out_dir: str, hang_deadline_s: float) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)  # 3 ranks and the test process share the cores: one thread each, no oversubscription
    dist.init_process_group(  # a collective waits for a slow rank as long as the fixture does
        "gloo", init_method=file_rendezvous(out_dir), rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=hang_deadline_s),
    )
    results = {}
    inputs64, labels = _make_data(torch.float64)

    # 1. float64 estimates and parameters, compared with the single-process reference.
    model = _ddp(_make_model(torch.float64))
    noise = DDPNoiseScale(model, LOCAL_BATCH, ema_decay=0.5)
    results["no_backward_error"] = capture_error(noise.step_estimate)
    results["estimate_params"] = _train(model, noise, inputs64, labels, rank)
    results["estimate_history"] = noise.history
    results["estimate_state"] = noise.state_dict()

    sparse = _ddp(_make_model(torch.float64))
    sparse_noise = DDPNoiseScale(sparse, LOCAL_BATCH, ema_decay=0.5, measure_every=2)
    _train(sparse, sparse_noise, inputs64, labels, rank)
    results["every_other_history"] = sparse_noise.history
    one_bucket = DistributedDataParallel(_make_model(torch.float64))  # default bucket size: the whole model
    one_bucket_noise = DDPNoiseScale(one_bucket, LOCAL_BATCH, ema_decay=0.5)
    _train(one_bucket, one_bucket_noise, inputs64, labels, rank)
    results["one_bucket_history"] = one_bucket_noise.history
    report_progress(out_dir, rank, "estimates")

    # 1b. collectives per step: the default reduction carries the totals in the last bucket's all-reduce;
    # a wrapped hook of PyTorch's needs one extra all-reduce per measured step. Both give the same estimates.
    for key, hook in (("mean_allreduce", mean_allreduce_hook), ("torch_allreduce", default_hooks.allreduce_hook)):
        with _counting_all_reduces([0]) as counter:
            bare = _ddp(_make_model(torch.float64))
            bare.register_comm_hook(None, hook)
            _train(bare, None, inputs64, labels, rank)
            results[f"{key}_bare_all_reduces"] = counter[0]
        with _counting_all_reduces([0]) as counter:
            wrapped = _ddp(_make_model(torch.float64))
            wrapped_noise = DDPNoiseScale(wrapped, LOCAL_BATCH, ema_decay=0.5, wrapped_hook=hook)
            _train(wrapped, wrapped_noise, inputs64, labels, rank)
            results[f"{key}_all_reduces"] = counter[0]
        results[f"{key}_history"] = wrapped_noise.history
        report_progress(out_dir, rank, f"hook_{key}")

    # 2. float32 training with and without the hook, momentum SGD.
    inputs32 = inputs64.float()
    plain = _ddp(_make_model(torch.float32))
    hooked = _ddp(_make_model(torch.float32))
    hooked_noise = DDPNoiseScale(hooked, LOCAL_BATCH)
    results["plain_params"] = _train(plain, None, inputs32, labels, rank, momentum=0.9)
    results["hooked_params"] = _train(hooked, hooked_noise, inputs32, labels, rank, momentum=0.9)
    reducing_only = _ddp(_make_model(torch.float32))
    reducing_only.register_comm_hook(None, mean_allreduce_hook)  # no process group given: the default group
    results["mean_allreduce_hook_params"] = _train(reducing_only, None, inputs32, labels, rank, momentum=0.9)
    as_view = _ddp(_make_model(torch.float32), gradient_as_bucket_view=True)  # p.grad are views of the buckets
    as_view_noise = DDPNoiseScale(as_view, LOCAL_BATCH)
    results["bucket_view_params"] = _train(as_view, as_view_noise, inputs32, labels, rank, momentum=0.9)
    results["bucket_view_history"] = as_view_noise.history
    results["float32_history"] = hooked_noise.history
    report_progress(out_dir, rank, "float32")

    # 3. NaN on one rank at one step; the optimizer skips the step when the estimate is NaN.
    poisoned = _ddp(_make_model(torch.float64))
    poisoned_noise = DDPNoiseScale(poisoned, LOCAL_BATCH)
    _train(poisoned, poisoned_noise, inputs64, labels, rank, poison=(NAN_STEP, NAN_RANK))
    results["nan_history"] = poisoned_noise.history
    results["nan_num_skipped"] = poisoned_noise.average.num_skipped
    report_progress(out_dir, rank, "nan")

    # 3b. the plain monitor on the DDP model, rank by rank, NaN on one rank's batch: every rank must skip the step.
    ranked = _ddp(_make_model(torch.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = NoiseScaleMonitor(ranked, per_example_cross_entropy)
        optimizer = torch.optim.SGD(ranked.parameters(), lr=LEARNING_RATE)
        skipped = []
        for step in range(STEPS):
            step_inputs = inputs64[step, rank] * (math.nan if (step, rank) == (NAN_STEP, NAN_RANK) else 1.0)
            optimizer.zero_grad()
            monitor(step_inputs, labels[step, rank])
            skipped.append(not monitor.last_step_finite)
            if not skipped[-1]:
                optimizer.step()
    results["ranked_warnings"] = [str(w.message) for w in caught]
    results["ranked_skipped"] = skipped
    results["ranked_params"] = [p.detach().clone() for p in ranked.parameters()]
    # and an infinite loss term with a finite gradient on rank 1 alone: its row is not finite, p.grad is; every
    # rank must still decide alike (a review: rank 1 skipped, the others stepped, the replicas drifted apart)

    def inf_on_rank_1(outputs, targets):
        return per_example_cross_entropy(outputs, targets) + (math.inf if rank == NAN_RANK else 0.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf_monitor = NoiseScaleMonitor(ranked, inf_on_rank_1)
        optimizer.zero_grad()
        inf_monitor(inputs64[0, rank], labels[0, rank])
    results["ranked_inf_loss_finite"] = inf_monitor.last_step_finite
    report_progress(out_dir, rank, "ranked")

    # 3c. AccumulatingNoiseScaleMonitor in a loop of one's own with unequal shares: refused on every rank (gloo
    # aborted the process in the all-gather of unequal lengths)
    from noisescale.training import AccumulatingNoiseScaleMonitor
    uneven = _ddp(_make_model(torch.float64))
    uneven_monitor = AccumulatingNoiseScaleMonitor(uneven, per_example_cross_entropy)
    share = slice(0, LOCAL_BATCH - rank)
    results["uneven_error"] = capture_error(
        lambda: uneven_monitor.accumulate([(inputs64[0, rank][share], labels[0, rank][share])]))
    results["uneven_grads"] = [p.grad for p in uneven.parameters()]
    report_progress(out_dir, rank, "uneven")

    # 4. local batch sizes that differ across ranks.
    poisoned_noise.local_batch_size = LOCAL_BATCH + rank
    _accumulated_backward(poisoned, inputs64[0, rank], labels[0, rank])
    results["batch_mismatch_error"] = capture_error(poisoned_noise.step_estimate)

    # 4b. a rejected grad_scale leaves nothing behind: the next step's |g_big|^2 is that of its own gradient.
    recovering = _ddp(_make_model(torch.float64))
    recovering_noise = DDPNoiseScale(recovering, LOCAL_BATCH)
    _accumulated_backward(recovering, inputs64[0, rank], labels[0, rank])
    results["grad_scale_error"] = capture_error(lambda: recovering_noise.step_estimate(grad_scale=0.0))
    recovering.zero_grad()
    _accumulated_backward(recovering, inputs64[1, rank], labels[1, rank])
    recovering_noise.step_estimate()
    results["recovered_global_sqnorm"] = recovering_noise.history["global_sqnorm"].iloc[-1]
    results["recovered_grad_sqnorm"] = sum(float(p.grad.square().sum()) for p in recovering.parameters())
    report_progress(out_dir, rank, "errors")

    # 5. per-example sums: naive per-example loop on this rank, |gbar|^2 from DDP's all-reduced gradient.
    reference = _make_model(torch.float64)
    sqnorms = []
    for i in range(LOCAL_BATCH):
        reference.zero_grad()
        F.cross_entropy(reference(inputs64[0, rank, i : i + 1]), labels[0, rank, i : i + 1]).backward()
        sqnorms.append(sum(float(p.grad.square().sum()) for p in reference.parameters()))
    plain64 = _ddp(_make_model(torch.float64))
    F.cross_entropy(plain64(inputs64[0, rank]), labels[0, rank]).backward()
    grad_sqnorm = sum(float(p.grad.square().sum()) for p in plain64.parameters())
    results["per_example_estimate"] = all_reduce_per_example_sums(sum(sqnorms), LOCAL_BATCH, grad_sqnorm)
    report_progress(out_dir, rank, "per_example")

    # 6. the adaptive trainer under DDP (noise-scale policy, micro-batches), and with a NaN example.
    # "adaptive_kappa": every rank but the first would keep the smallest batch; rank 0's decisions must rule.
    # "adaptive_batch_norm": every rank's micro-batches are units of the global batch's micro-batch estimate.
    # "adaptive_adascale": AdaScale's gain at every step, from averages every rank holds alike.
    for key, dataset, kappa in (("adaptive", _trainer_data(), 4.0), ("adaptive_nan", _trainer_data(poison=True), 4.0),
                                ("adaptive_kappa", _trainer_data(), 4.0 if rank == 0 else 1e-3),
                                ("adaptive_batch_norm", _trainer_data(), 4.0),
                                ("adaptive_adascale", _trainer_data(), 4.0)):
        model = _make_batch_norm_model() if key == "adaptive_batch_norm" else _make_model(torch.float64)
        trainer = _adaptive_trainer(_ddp(model), dataset, kappa, "adascale" if key == "adaptive_adascale" else "sqrt")
        with trainer:
            for _ in range(TRAINER_STEPS):
                trainer.step()
        results[f"{key}_params"] = [p.detach().clone() for p in trainer.model.parameters()]
        results[f"{key}_history"] = trainer.history
        results[f"{key}_checkpoint"] = trainer.state_dict()
        report_progress(out_dir, rank, f"trainer_{key}")

    # 6a. batches holding a fully masked sequence: a 0/0 loss with finite gradients, measured or not.
    trainer = _masked_token_trainer(_ddp(_make_token_model()))
    with trainer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(TRAINER_STEPS):
            trainer.step()
    results["masked_history"] = trainer.history
    results["masked_params"] = [p.detach().clone() for p in trainer.model.parameters()]
    report_progress(out_dir, rank, "masked")

    # 6c. a token mean of one's own under DDP: each rank's step would be normalised by its own count. Rank 0's
    # sequences count one token each (its check alone passes), the other ranks' do not: every rank refuses, p.grad left
    # at None. With two examples a rank nothing can be judged: every rank warns. Through AdaptiveTrainer: refused
    # before the step, nothing drawn or trained.
    tokens, labels = _rank_token_batch(rank)
    own = _ddp(_make_token_model())
    own_monitor = AccumulatingNoiseScaleMonitor(own, _own_token_mean, check_independence=False)
    results["own_token_mean_error"] = capture_error(lambda: own_monitor.accumulate([(tokens, labels)]))
    results["own_token_mean_grads"] = [p.grad for p in own.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = AccumulatingNoiseScaleMonitor(_ddp(_make_token_model()), _token_mean, check_independence=False)
        pair.accumulate([(tokens[:2], labels[:2])])
    results["pair_warnings"] = [str(warning.message) for warning in caught]
    varied = torch.stack([_rank_token_batch(1 + index % 2)[1] for index in range(12)]).reshape(48, 5)
    model = _ddp(_make_token_model())
    trainer = AdaptiveTrainer(model, _own_token_mean, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                              TensorDataset(varied.clamp(min=0), varied), batch_size=12, seed=4, progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    results["own_token_mean_trainer_error"] = capture_error(trainer.step)
    results["own_token_mean_trainer_state"] = (trainer.steps, trainer.sampler.examples_seen, all(
        torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())))
    trainer.close()
    # a forward that communicates (as SyncBatchNorm's does): rank 0 finds the token mean in its first micro-batch,
    # the others only in their second; every rank runs both forwards of the check and refuses (rank 0 returned
    # after its first, and the ranks' collectives paired wrongly: a hang until the group's timeout)
    talking = _ddp(AllReducingTokenModel())
    first, second = _rank_token_batch(1), _rank_token_batch(0)
    parts = [(first[0][:3], first[1][:3]), (second[0][:3], second[1][:3])]
    talking_monitor = AccumulatingNoiseScaleMonitor(talking, _own_token_mean, check_independence=False)
    results["talking_error"] = capture_error(lambda: talking_monitor.accumulate(parts if rank == 0 else parts[::-1]))
    report_progress(out_dir, rank, "own_token_mean")

    # 6b. the reverse resume: a one-process checkpoint (trained here on every rank) continued under DDP.
    single = _adaptive_trainer(_make_model(torch.float64), _trainer_data())
    with single:
        for _ in range(TRAINER_STEPS):
            single.step()
    resumed = _adaptive_trainer(_ddp(_make_model(torch.float64)), _trainer_data())
    with resumed:
        resumed.load_state_dict(single.state_dict())
        for _ in range(2):
            resumed.step()
    results["resumed_from_single_history"] = resumed.history
    results["resumed_from_single_params"] = [p.detach().clone() for p in resumed.model.parameters()]
    report_progress(out_dir, rank, "resume")

    # 7. B_noise under DDP: every rank's Hessian proxies from its own shard, averaged over the ranks.
    trainer = _hessian_trainer(_ddp(_make_model(torch.float64)))
    with trainer:
        for _ in range(HESSIAN_STEPS):
            trainer.step()
    results["hessian_history"] = trainer.history

    # 8. population_size: every draw without replacement of one example per rank from POPULATION examples, at
    # fixed parameters (no optimizer step); an error (an older DDPNoiseScale) is recorded, not raised
    def every_draw():
        model = _ddp(_make_model(torch.float64))
        noise = DDPNoiseScale(model, 1, population_size=POPULATION)
        inputs, labels = _population_data()
        for order in itertools.permutations(range(POPULATION), WORLD_SIZE):
            model.zero_grad()
            example = order[rank]
            F.cross_entropy(model(inputs[example:example + 1]), labels[example:example + 1]).backward()
            noise.step_estimate()
        results["population_history"] = noise.history
        results["population_state"] = noise.state_dict()

    results["population_error"] = capture_error(every_draw)
    report_progress(out_dir, rank, "population")

    # 9. a loop of one's own, its backward kept, observed (docs/own-loop.md): one row per step, the global batch's
    own_inputs, own_labels = _make_data(torch.float64)
    own = _ddp(_make_model(torch.float64))
    observer = ObservingNoiseScaleMonitor(own, NoiseScaleOptions(population_size=None))
    optimizer = torch.optim.SGD(own.parameters(), lr=LEARNING_RATE)
    results["own_loop_rows"] = []
    for step in range(STEPS):
        _accumulated_backward(own, own_inputs[step, rank], own_labels[step, rank], observer)
        results["own_loop_rows"].append(observer.end_step())
        optimizer.step()
        optimizer.zero_grad()
    results["own_loop_params"] = [p.detach().clone() for p in own.parameters()]
    report_progress(out_dir, rank, "own loop")

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    report_progress(out_dir, rank, "saved")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory, hang_deadline_s):
    """Every rank's results; fails when no rank reports progress for ``hang_deadline_s`` (a hang, not slowness)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_worker, (str(out_dir), hang_deadline_s), WORLD_SIZE, out_dir, hang_deadline_s)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _gradient(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(inputs), labels).backward()
    return [p.grad.clone() for p in model.parameters()]


def _sqnorm(gradient: list[torch.Tensor]) -> float:
    return sum(float(g.square().sum()) for g in gradient)


def test_ddp_estimate_matches_single_process_two_batch_estimate(rank_results):
    """Single process: the two rank-local gradients of the two shards and the full-batch gradient, directly."""
    inputs, labels = _make_data(torch.float64)
    model = _make_model(torch.float64)
    expected = []
    for step in range(STEPS):
        local = [_sqnorm(_gradient(model, inputs[step, r], labels[step, r])) for r in range(WORLD_SIZE)]
        full_gradient = _gradient(model, inputs[step].reshape(-1, INPUTS), labels[step].reshape(-1))
        expected.append(
            two_batch_noise_scale(sum(local) / WORLD_SIZE, LOCAL_BATCH, _sqnorm(full_gradient), WORLD_SIZE * LOCAL_BATCH)
        )
        with torch.no_grad():
            for p, g in zip(model.parameters(), full_gradient):
                p -= LEARNING_RATE * g
    for result in rank_results:
        history = result["estimate_history"]
        assert list(history["skipped"]) == [False] * STEPS
        assert list(history["global_batch_size"]) == [WORLD_SIZE * LOCAL_BATCH] * STEPS
        for row, reference in zip(history.itertuples(), expected):
            assert row.grad_sqnorm == pytest.approx(reference.grad_sqnorm, rel=1e-6)
            assert row.trace_sigma == pytest.approx(reference.trace_sigma, rel=1e-6)
        for trained, p in zip(result["estimate_params"], model.parameters()):
            torch.testing.assert_close(trained, p.detach(), rtol=1e-10, atol=1e-12)


def test_a_loop_of_ones_own_observed_under_ddp_is_the_per_example_loop_over_the_global_batch(rank_results):
    """ObservingNoiseScaleMonitor fed by a loop of one's own (no_sync accumulation, 3 ranks x 2 micro-batches of 4):
    every rank's row is the per-example estimate of the step's 24 examples, each example's gradient taken alone in
    one process; the training is that of the single-process loop."""
    inputs, labels = _make_data(torch.float64)
    model = _make_model(torch.float64)
    expected = []
    for step in range(STEPS):
        examples, targets = inputs[step].reshape(-1, INPUTS), labels[step].reshape(-1)
        grads = torch.stack([torch.cat([g.flatten() for g in _gradient(model, examples[i:i + 1], targets[i:i + 1])])
                             for i in range(len(examples))])
        expected.append(simple_noise_scale(grads.square().sum(1), grads.mean(0).square().sum()))
        full_gradient = _gradient(model, examples, targets)
        with torch.no_grad():
            for p, g in zip(model.parameters(), full_gradient):
                p -= LEARNING_RATE * g
    for result in rank_results:
        rows = result["own_loop_rows"]
        assert [row["batch_size"] for row in rows] == [WORLD_SIZE * LOCAL_BATCH] * STEPS
        for row, reference in zip(rows, expected):
            assert row["trace_sigma"] == pytest.approx(reference.trace_sigma, rel=1e-10)
            assert row["grad_sqnorm"] == pytest.approx(reference.grad_sqnorm, rel=1e-9, abs=1e-12)
        for trained, p in zip(result["own_loop_params"], model.parameters()):
            torch.testing.assert_close(trained, p.detach(), rtol=1e-10, atol=1e-12)


def test_measure_every_measures_the_same_steps_as_every_step_measurement(rank_results):
    for result in rank_results:
        every_step, every_other = result["estimate_history"], result["every_other_history"]
        assert list(every_other["step"]) == list(range(0, STEPS, 2))
        columns = ["local_sqnorm", "global_sqnorm", "grad_sqnorm", "trace_sigma"]
        expected = every_step.set_index("step").loc[every_other["step"], columns].to_numpy()
        assert every_other[columns].to_numpy() == pytest.approx(expected, rel=1e-12)


def test_one_bucket_gives_the_estimates_of_many_buckets(rank_results):
    """The last bucket carries one local squared norm per bucket: one (the whole model) or several."""
    columns = ["local_sqnorm", "global_sqnorm", "grad_sqnorm", "trace_sigma", "b_simple"]
    for result in rank_results:
        np.testing.assert_allclose(result["one_bucket_history"][columns], result["estimate_history"][columns],
                                   rtol=1e-12)


def test_default_reduction_carries_the_totals_without_an_extra_collective(rank_results):
    """Per step DDP all-reduces each bucket once; the default adds nothing but one (b, b^2) check at the first
    step (the local batch size is new); a wrapped PyTorch hook adds one all-reduce per step for the totals."""
    for result in rank_results:
        assert result["mean_allreduce_all_reduces"] == result["mean_allreduce_bare_all_reduces"] + 1
        assert result["torch_allreduce_all_reduces"] == result["torch_allreduce_bare_all_reduces"] + STEPS + 1
        assert result["mean_allreduce_bare_all_reduces"] > STEPS  # more than one bucket in some backward
        columns = ["local_sqnorm", "global_sqnorm", "grad_sqnorm", "trace_sigma", "b_simple"]
        for key in ("mean_allreduce", "torch_allreduce"):
            np.testing.assert_allclose(
                result[f"{key}_history"][columns], result["estimate_history"][columns], rtol=1e-12, err_msg=key
            )


def test_ema_in_history_matches_estimators_average(rank_results):
    from noisescale.estimators import ExponentialMovingNoiseScale

    history = rank_results[0]["estimate_history"]
    average = ExponentialMovingNoiseScale(0.5)
    for row in history.itertuples():
        average.update(row.trace_sigma, row.grad_sqnorm)
    assert history["b_simple"].iloc[-1] == pytest.approx(average.b_simple, rel=1e-12)
    state = rank_results[0]["estimate_state"]
    assert state["step"] == STEPS and state["average"]["num_updates"] == STEPS


def test_ddp_population_size_makes_the_estimates_exact_over_every_draw_without_replacement(rank_results):
    """3 gloo ranks, one example each, over all 60 draws without replacement from 5 examples at fixed parameters:
    with population_size=5 the mean of the step estimates is the dataset's |G|^2 and tr(Sigma) (divisor N, from a
    loop of per-example gradients in this process) to 1e-10 relative, on every rank. Without a correction (the
    history's own local and global norms, the arithmetic DDPNoiseScale used before) |G|^2 reads low by exactly
    tr(Sigma)/(N - 1) and tr(Sigma) high by N/(N - 1)."""
    from noisescale.estimators import _two_batch_estimate
    inputs, labels = _population_data()
    model = _make_model(torch.float64)
    per_example = torch.stack([torch.cat([g.flatten() for g in _gradient(model, inputs[k:k + 1], labels[k:k + 1])])
                               for k in range(POPULATION)])
    mean = per_example.mean(0)
    grad_sqnorm = float(mean @ mean)
    trace_sigma = float((per_example - mean).square().sum(1).mean())
    for result in rank_results:
        assert result["population_error"] is None
        history = result["population_history"]
        assert len(history) == 60 and not history["skipped"].any()
        assert history["grad_sqnorm"].mean() == pytest.approx(grad_sqnorm, rel=1e-10)
        assert history["trace_sigma"].mean() == pytest.approx(trace_sigma, rel=1e-10)
        assert result["population_state"]["population_size"] == POPULATION
        uncorrected = [_two_batch_estimate(row.local_sqnorm, 1, row.global_sqnorm, WORLD_SIZE)
                       for row in history.itertuples()]
        assert np.mean([e.grad_sqnorm for e in uncorrected]) == pytest.approx(
            grad_sqnorm - trace_sigma / (POPULATION - 1), rel=1e-10)
        assert np.mean([e.trace_sigma for e in uncorrected]) == pytest.approx(
            trace_sigma * POPULATION / (POPULATION - 1), rel=1e-10)


def _token_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean token loss written sum / count: 0/0 for one whose every label is ignored (-100), whose
    gradient is 0 all the same."""
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return losses.sum(1) / (targets != -100).sum(1)


def _own_token_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch's token mean written in one's own function (undeclared): each sequence's summed token loss over the
    batch's mean count, so that the mean over the batch is sum / count over its tokens."""
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return losses.sum(1) / (targets != -100).sum() * len(targets)


def _rank_token_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four sequences of 5 tokens: rank 0's each with one counted token (no check on them alone can tell a count:
    alike, and none to ignore), the other ranks' masked from positions 2 to 5 on."""
    tokens = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(5 + rank))
    lengths = torch.tensor([1, 1, 1, 1] if rank == 0 else [5, 2, 4, 3])
    return tokens, tokens.masked_fill(torch.arange(5) >= lengths[:, None], -100)


def _masked_token_trainer(model: torch.nn.Module) -> AdaptiveTrainer:
    """48 sequences of 5 tokens, two of them fully masked; B = 12 in micro-batches of 2 per process, every other
    step measured."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 10, (48, 5), generator=generator)
    labels = tokens.roll(-1, 1)
    labels[[5, 30]] = -100
    return AdaptiveTrainer(model, _token_mean, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                           TensorDataset(tokens, labels), batch_size=12, max_micro_batch=2,
                           monitor_options={"measure_every": 2}, seed=4, progress=False)


class AllReducingTokenModel(torch.nn.Module):
    """The token model whose forward all-reduces a statistic of its activations (as SyncBatchNorm does)."""

    def __init__(self):
        super().__init__()
        self.inner = _make_token_model()

    def forward(self, tokens):
        hidden = self.inner[0](tokens)
        total = hidden.detach().sum()
        dist.all_reduce(total)
        return self.inner[1](hidden + 0.0 * total)


def _make_token_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10)).double()


def test_hook_leaves_training_bit_identical(rank_results):
    for result in rank_results:
        for plain, hooked, as_view, reducing_only in zip(result["plain_params"], result["hooked_params"],
                                                         result["bucket_view_params"],
                                                         result["mean_allreduce_hook_params"]):
            assert torch.equal(plain, hooked)
            assert torch.equal(plain, as_view)  # gradient_as_bucket_view=True too
            assert torch.equal(plain, reducing_only)  # mean_allreduce_hook alone, registered without a group
        pd.testing.assert_frame_equal(result["bucket_view_history"], result["float32_history"])
    for other in rank_results[1:]:
        for rank0, rank_r in zip(rank_results[0]["hooked_params"], other["hooked_params"]):
            assert torch.equal(rank0, rank_r)


def test_nan_on_one_rank_is_skipped_by_every_rank(rank_results):
    histories = [result["nan_history"] for result in rank_results]
    for history in histories:
        assert list(history["skipped"]) == [step == NAN_STEP for step in range(STEPS)]
        assert history.drop(index=NAN_STEP)[["grad_sqnorm", "trace_sigma"]].map(math.isfinite).all().all()
    assert all(histories[0].equals(history) for history in histories[1:])  # every column, NaNs alike
    assert [result["nan_num_skipped"] for result in rank_results] == [1] * WORLD_SIZE


def test_the_plain_monitor_on_a_ddp_model_warns_and_every_rank_skips_a_step_another_ranks_nan_broke(rank_results):
    """NoiseScaleMonitor on the DDP model measures each rank's share: said once at construction. A NaN input on one
    rank made the all-reduced p.grad NaN on every rank, while the other ranks' own rows were finite: they stepped on
    it (the parameters NaN from then on, the run called diverged) and only the poisoned rank skipped (a survey's
    find). last_step_finite reads the all-reduced p.grad too: every rank skips that step, and the parameters stay
    finite and the same on every rank."""
    for result in rank_results:
        assert any("measures each rank's own share" in message for message in result["ranked_warnings"])
        assert result["ranked_skipped"] == [step == NAN_STEP for step in range(STEPS)]
        assert all(torch.isfinite(p).all() for p in result["ranked_params"])
        for p, q in zip(result["ranked_params"], rank_results[0]["ranked_params"]):
            assert torch.equal(p, q)
    assert [result["ranked_inf_loss_finite"] for result in rank_results] == [True] * WORLD_SIZE


def test_unequal_shares_are_refused_by_every_rank_of_a_loop_of_ones_own(rank_results):
    """AccumulatingNoiseScaleMonitor.accumulate on the DDP model with 8, 7 and 6 examples on the 3 ranks: gloo aborted
    every process in the all-gather of unequal lengths (a survey's find); every rank now refuses, naming the sizes,
    with p.grad put back as it was (None)."""
    for result in rank_results:
        kind, message = result["uneven_error"]
        assert kind == "ValueError" and "the ranks' batches differ in size ([8, 7, 6])" in message
        assert all(grad is None for grad in result["uneven_grads"])


def test_adaptive_ddp_run_equals_the_single_process_run_with_the_same_global_batches(rank_results):
    """Same policy, seed and micro-batches of 2 on one process: the global batch the 3 ranks share is the batch
    the single process draws, so batch sizes, noise scales and parameters must agree (float64 tolerance)."""
    reference = _adaptive_trainer(_make_model(torch.float64), _trainer_data())
    with reference:
        for _ in range(TRAINER_STEPS):
            reference.step()
    expected = reference.history
    assert expected["batch_size"].nunique() > 1  # the policy did change B during the run
    for result in rank_results:
        history = result["adaptive_history"]
        assert history["batch_size"].tolist() == expected["batch_size"].tolist()
        assert history["examples_seen"].tolist() == expected["examples_seen"].tolist()
        assert history["micro_batches"].tolist() == expected["micro_batches"].tolist()  # all ranks' together
        assert history["micro_batch_size"].tolist() == [2] * TRAINER_STEPS
        for column in ("learning_rate", "loss", "grad_sqnorm", "trace_sigma", "b_simple", "b_simple_two_batch"):
            np.testing.assert_allclose(history[column], expected[column], rtol=1e-9, err_msg=column)
        for trained, p in zip(result["adaptive_params"], reference.model.parameters()):
            torch.testing.assert_close(trained, p.detach(), rtol=1e-10, atol=1e-12)
        # ranks 1 and 2 run policies with a tiny kappa, yet every rank follows rank 0's (the reference's) batches
        assert result["adaptive_kappa_history"]["batch_size"].tolist() == expected["batch_size"].tolist()


def test_adascale_under_ddp_equals_the_single_process_run(rank_results):
    """lr_coupling="adascale" on 3 ranks: the gain of B / B_0 from the monitor's averages, which every rank holds
    alike, gives each rank the learning rates, batch sizes and parameters of the one process with the same global
    batches (float64 tolerance), and the factor moves from step to step."""
    reference = _adaptive_trainer(_make_model(torch.float64), _trainer_data(), lr_coupling="adascale")
    with reference:
        for _ in range(TRAINER_STEPS):
            reference.step()
    expected = reference.history
    assert expected["learning_rate"].nunique() > 2
    for result in rank_results:
        history = result["adaptive_adascale_history"]
        assert history["batch_size"].tolist() == expected["batch_size"].tolist()
        np.testing.assert_allclose(history["learning_rate"], expected["learning_rate"], rtol=1e-9)
        for trained, p in zip(result["adaptive_adascale_params"], reference.model.parameters()):
            torch.testing.assert_close(trained, p.detach(), rtol=1e-10, atol=1e-12)


def test_a_batch_norm_model_under_ddp_equals_the_single_process_run_with_the_same_micro_batches(rank_results):
    """BatchNorm in train mode: each rank's micro-batches of 2, normalised by their own statistics, are the units of
    the global batch's estimate, as the one process's micro-batches of 2 are: the same batch sizes, estimates and
    parameters (the running statistics differ: DDP broadcasts rank 0's)."""
    reference = _adaptive_trainer(_make_batch_norm_model(), _trainer_data())
    with reference:
        for _ in range(TRAINER_STEPS):
            reference.step()
    expected = reference.history
    assert expected["trace_sigma"].notna().all() and "trace_sigma_two_batch" not in expected
    for result in rank_results:
        history = result["adaptive_batch_norm_history"]
        assert history["batch_size"].tolist() == expected["batch_size"].tolist()
        assert history["micro_batches"].tolist() == expected["micro_batches"].tolist()
        for column in ("loss", "grad_sqnorm", "trace_sigma", "b_simple"):
            np.testing.assert_allclose(history[column], expected[column], rtol=1e-9, err_msg=column)
        for trained, p in zip(result["adaptive_batch_norm_params"], reference.model.parameters()):
            torch.testing.assert_close(trained, p.detach(), rtol=1e-10, atol=1e-12)


def test_checkpoints_move_between_ddp_and_a_single_process(rank_results):
    """Rank 0's checkpoint after the DDP run, loaded into a one-process trainer, continues as the one-process
    reference does, and a one-process checkpoint continued by the 3 ranks too: the model state has no DDP prefix
    and the sampler takes any number of replicas."""
    reference = _adaptive_trainer(_make_model(torch.float64), _trainer_data())
    resumed = _adaptive_trainer(_make_model(torch.float64), _trainer_data())
    with reference, resumed:
        for _ in range(TRAINER_STEPS):
            reference.step()
        resumed.load_state_dict(rank_results[0]["adaptive_checkpoint"])
        for _ in range(2):
            reference.step()
            resumed.step()
    assert resumed.history["batch_size"].tolist() == reference.history["batch_size"].tolist()
    np.testing.assert_allclose(resumed.history["b_simple"], reference.history["b_simple"], rtol=1e-9)
    for resumed_p, reference_p in zip(resumed.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(resumed_p, reference_p, rtol=1e-10, atol=1e-12)
    # and back: a one-process checkpoint continued by the 3 ranks gives the same two steps
    for result in rank_results:
        history = result["resumed_from_single_history"]
        assert history["batch_size"].tolist() == reference.history["batch_size"].tolist()
        np.testing.assert_allclose(history["b_simple"], reference.history["b_simple"], rtol=1e-9)
        for resumed_p, reference_p in zip(result["resumed_from_single_params"], reference.model.parameters()):
            torch.testing.assert_close(resumed_p, reference_p, rtol=1e-10, atol=1e-12)


def test_nan_example_on_one_rank_leaves_every_rank_in_agreement(rank_results):
    histories = [result["adaptive_nan_history"].drop(columns="seconds") for result in rank_results]
    nonfinite = histories[0]["nonfinite"].astype(bool)
    assert nonfinite.any() and not nonfinite.iloc[0]  # the poisoned example was drawn, after a finite step
    # the rank that drew it names it in every rank's history: the ranks' counts are exchanged on that step
    assert histories[0].loc[nonfinite, "nonfinite_data"].tolist() == ["NaN in its inputs (1 value)"] * nonfinite.sum()
    for history, result in zip(histories[1:], rank_results[1:]):
        pd.testing.assert_frame_equal(history, histories[0])  # the same rows on every rank, NaNs alike
        for rank0, rank_r in zip(rank_results[0]["adaptive_nan_params"], result["adaptive_nan_params"]):
            torch.testing.assert_close(rank_r, rank0, rtol=0, atol=0, equal_nan=True)


def test_a_0_over_0_loss_is_stepped_on_under_ddp_as_in_one_process_measured_or_not(rank_results):
    """A sequence whose every label is ignored makes the loss 0/0 with finite gradients. Under DDP an unmeasured such
    step was taken for a non-finite one (p.grad was read outside DDP only) and skipped, with the run called
    diverged; every rank now reads the whole p.grad's finiteness (one all-reduce, on this path only) and steps as
    the one process with the same global batches does."""
    reference = _masked_token_trainer(_make_token_model())
    with reference, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(TRAINER_STEPS):
            reference.step()
    expected = reference.history
    masked = expected["loss"].isna()
    assert set(expected.loc[masked, "measured"]) == {True, False}   # both kinds of step met
    assert not expected["skipped"].any() and expected.loc[masked, "finite_gradient"].eq(True).all()
    for result in rank_results:
        history = result["masked_history"]
        assert history["skipped"].tolist() == [False] * TRAINER_STEPS
        assert history["finite_gradient"].eq(True).tolist() == expected["finite_gradient"].eq(True).tolist()
        np.testing.assert_allclose(history["trace_sigma"], expected["trace_sigma"], rtol=1e-9)
        for trained, p in zip(result["masked_params"], reference.model.parameters()):
            torch.testing.assert_close(trained, p.detach(), rtol=1e-10, atol=1e-12)


def test_a_token_mean_of_ones_own_is_refused_by_every_rank_under_ddp(rank_results):
    """Session 29 left it silent: under DDP a token mean in one's own function trained the mean of the ranks' token
    means. Each rank now checks its own batch (a forward of the module inside DDP) and the ranks' verdicts are
    combined: rank 0, whose sequences count one token each, refuses with the others, and p.grad stays None; a rank of
    two examples cannot be judged, and every rank says so. The reference: in one process, rank 1's batch alone,
    split in two, is refused by the same check, and the ranks' token means do differ from the global one."""
    from noisescale.training import AccumulatingNoiseScaleMonitor

    for result in rank_results:
        kind, message = result["own_token_mean_error"]
        assert kind == "ValueError" and "differ when its examples are computed alone" in message
        assert "the batch of 12 would be split over 3 ranks" in message
        assert all(grad is None for grad in result["own_token_mean_grads"])
        assert ["could not check whether loss_fn normalises" in text for text in result["pair_warnings"]] == [True]
        assert "split over 3 ranks" in result["pair_warnings"][0]
        kind, message = result["own_token_mean_trainer_error"]
        assert kind == "ValueError" and "split over 3 ranks" in message
        assert result["own_token_mean_trainer_state"] == (0, 0, True)
        kind, message = result["talking_error"]
        assert kind == "ValueError" and "differ when its examples are computed alone" in message
    tokens, labels = _rank_token_batch(1)
    single = AccumulatingNoiseScaleMonitor(_make_token_model(), _own_token_mean, check_independence=False)
    with pytest.raises(ValueError, match="a token mean.*accumulated from 2 micro-batches"):
        single.accumulate([(tokens[:2], labels[:2]), (tokens[2:], labels[2:])])
    tokens, labels = _rank_token_batch(0)   # rank 0's batch alone shows nothing
    AccumulatingNoiseScaleMonitor(_make_token_model(), _own_token_mean, check_independence=False).accumulate(
        [(tokens[:2], labels[:2]), (tokens[2:], labels[2:])])
    batches = [_rank_token_batch(rank) for rank in range(WORLD_SIZE)]
    model = _make_token_model()
    ranks_mean = sum(_own_token_mean(model(t), l).mean() for t, l in batches) / WORLD_SIZE
    whole = _own_token_mean(model(torch.cat([t for t, _ in batches])), torch.cat([l for _, l in batches])).mean()
    assert abs(float(ranks_mean - whole)) > 1e-3   # worth refusing


def test_hessian_proxies_are_the_mean_over_ranks_of_each_shard(rank_results):
    """Step 0 in one process: hessian_noise_scale on each rank's shard of the first global batch with that rank's
    probes (seed (seed + step) R + r), averaged; the standard errors combine as sqrt(sum se^2) / R. Every rank
    records the same B_noise."""
    dataset = _trainer_data()
    model = _make_model(torch.float64)
    per_rank = []
    for rank in range(WORLD_SIZE):
        sampler = ResizableBatchSampler(len(dataset), WORLD_SIZE * 4, seed=4, num_replicas=WORLD_SIZE, rank=rank)
        inputs, targets = dataset[next(iter(sampler))]
        per_rank.append(hessian_noise_scale(model, per_example_cross_entropy, inputs, targets, num_probes=4,
                                            num_sigma_examples=MICRO_BATCH, population=len(dataset),
                                            generator=torch.Generator().manual_seed(HESSIAN_SEED * WORLD_SIZE + rank)))
    assert len({proxies.trace_h for proxies in per_rank}) == WORLD_SIZE  # the shards do differ
    histories = [result["hessian_history"] for result in rank_results]
    first = histories[0].iloc[0]
    for column in ("trace_h", "g_h_g", "trace_h_sigma", "fisher_trace"):
        expected = np.mean([getattr(proxies, column) for proxies in per_rank])
        assert first[column] == pytest.approx(expected, rel=1e-10), column
    expected_stderr = math.sqrt(sum(proxies.trace_h_stderr**2 for proxies in per_rank)) / WORLD_SIZE
    assert first["trace_h_stderr"] == pytest.approx(expected_stderr, rel=1e-10)
    columns = ["trace_h", "trace_h_stderr", "g_h_g", "trace_h_sigma", "fisher_trace", "b_noise"]
    assert histories[0][columns].notna().all().all() and len(histories[0]) == HESSIAN_STEPS
    for history in histories[1:]:
        pd.testing.assert_frame_equal(history[columns], histories[0][columns])


def test_errors_are_raised_on_every_rank(rank_results):
    for result in rank_results:
        kind, message = result["batch_mismatch_error"]
        assert kind == "ValueError" and "local batch sizes differ across ranks" in message
        kind, message = result["no_backward_error"]
        assert kind == "RuntimeError" and "found 0 synchronising backwards" in message
        kind, message = result["grad_scale_error"]
        assert kind == "ValueError" and "grad_scale must be a finite number > 0" in message
        assert result["recovered_global_sqnorm"] == pytest.approx(result["recovered_grad_sqnorm"], rel=1e-12)


def test_all_reduce_per_example_sums_matches_simple_noise_scale(rank_results):
    inputs, labels = _make_data(torch.float64)
    model = _make_model(torch.float64)
    batch_inputs, batch_labels = inputs[0].reshape(-1, INPUTS), labels[0].reshape(-1)
    sqnorms = [_sqnorm(_gradient(model, batch_inputs[i : i + 1], batch_labels[i : i + 1])) for i in range(len(batch_labels))]
    expected = simple_noise_scale(sqnorms, _sqnorm(_gradient(model, batch_inputs, batch_labels)))
    for result in rank_results:
        estimate = result["per_example_estimate"]
        assert estimate.batch_size == WORLD_SIZE * LOCAL_BATCH
        assert estimate.trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-10)
        assert estimate.grad_sqnorm == pytest.approx(expected.grad_sqnorm, rel=1e-10)


def test_combine_per_example_sums_with_unequal_counts():
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randn(9, 5, generator=generator, dtype=torch.float64) + 0.3
    sqnorms = vectors.square().sum(dim=1)
    grad_sqnorm = float(vectors.mean(dim=0).square().sum())
    counts = [2, 7, 0]
    sums = torch.stack([sqnorms[:2].sum(), sqnorms[2:].sum(), torch.tensor(0.0, dtype=torch.float64)])
    combined = combine_per_example_sums(sums, counts, grad_sqnorm)
    expected = simple_noise_scale(sqnorms, grad_sqnorm)
    assert combined.trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-12)
    assert combined.grad_sqnorm == pytest.approx(expected.grad_sqnorm, rel=1e-12)
    assert combined.batch_size == 9


@pytest.mark.parametrize(
    ("sums", "counts", "match"),
    [([1.0, 2.0], [3], "one entry per rank"), ([1.0], [1], "at least 2 examples"), ([1.0, 1.0], [2, -1], ">= 0"),
     ([1.0], [2.5], "whole numbers")],
)
def test_combine_per_example_sums_rejects_bad_input(sums, counts, match):
    with pytest.raises(ValueError, match=match):
        combine_per_example_sums(sums, counts, 0.1)


def test_a_token_mean_of_ones_own_is_taken_unsplit_by_ddp_of_one_process():
    """DDP in one process, one micro-batch: the step is the whole batch's, so a token mean is right. The check
    ran there all the same and refused it, with a message naming no split (a review's find); p.grad now equals a
    plain backward's of the batch's token mean (float64)."""
    from noisescale.training import AccumulatingNoiseScaleMonitor

    tokens, labels = _rank_token_batch(1)
    reference = _make_token_model()
    _own_token_mean(reference(tokens), labels).mean().backward()
    with one_rank_process_group():
        model = DistributedDataParallel(_make_token_model())
        AccumulatingNoiseScaleMonitor(model, _own_token_mean, check_independence=False).accumulate([(tokens, labels)])
        module = model.module
        del model   # the DDP reducer goes with the group (one_rank_process_group)
    for p, q in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_construction_errors_single_process():
    model = _make_model(torch.float32)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        DDPNoiseScale(model, 8)
    with one_rank_process_group():
        ddp_model = DistributedDataParallel(model)
        with pytest.raises(ValueError, match="world size is 1.*accumulation"):
            DDPNoiseScale(ddp_model, 8)
        with pytest.raises(ValueError, match="population_size must be >= 2, got 1"):
            DDPNoiseScale(ddp_model, 8, population_size=1)
        with pytest.raises(TypeError, match="population_size must be an int"):
            DDPNoiseScale(ddp_model, 8, population_size=10.0)
    with pytest.raises(RuntimeError, match="not initialised"):
        DDPNoiseScale(ddp_model, 8)
