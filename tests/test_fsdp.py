"""FSDP2 (fully_shard) and FSDP1 (flat parameters, use_orig_params=True) on 2 gloo CPU ranks against one process.

One spawn of 2 ranks (module fixture) runs every scenario, one thread per rank, and saves its results; the tests
compare them with float64 references computed here: a naive per-example loop of the unsharded model and the
single-process AdaptiveTrainer on the same global batches. No wall-clock deadline: a rank that fails ends the
spawn with its error; only a hang (no rank alive and no result) would block.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from datetime import timedelta
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

from _ranks import capture_error, file_rendezvous, one_rank_process_group, spawn_ranks, torchrun_noisescale
from noisescale.app.cli import main
from noisescale.controller import NoiseScaleBatchPolicy
from noisescale.losses import per_example_cross_entropy
from noisescale.monitor import NoiseScaleMonitor
from noisescale.per_example import PerExampleGradNorms
from noisescale.training import AdaptiveTrainer

WORLD_SIZE = 2
LOCAL_BATCH, POSITIONS, WIDTH, CLASSES = 4, 3, 8, 3
KINDS = ("fsdp2", "fsdp1_flat", "fsdp1_orig")
TRAINER_STEPS, LEARNING_RATE = 6, 0.1


class Block(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)), optionally under non-reentrant activation checkpointing."""

    def __init__(self, recompute: bool):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)
        self.recompute = recompute

    def _forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))

    def forward(self, x):
        return checkpoint(self._forward, x, use_reentrant=False) if self.recompute else self._forward(x)


class Net(nn.Module):
    """Two blocks over (B, T, d) inputs, a LayerNorm and a head on the mean over positions."""

    def __init__(self, recompute: bool = False):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList([Block(recompute), Block(recompute)])
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class TiedNet(Net):
    """Net with its output tied to the input layer's weight (d classes): read directly, F.linear(h, embed.weight)
    outside any module call, as OLMo ties its output; or through a module, an nn.Linear sharing the weight."""

    def __init__(self, through_module: bool):
        super().__init__()
        self.through_module = through_module
        if through_module:
            self.head = nn.Linear(WIDTH, WIDTH, bias=False)
            self.head.weight = self.embed.weight
        else:
            del self.head

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        hidden = self.norm(x).mean(1)
        return self.head(hidden) if self.through_module else F.linear(hidden, self.embed.weight)


class _RecurrentBlock(nn.Module):
    """x + the outputs of a 2-layer recurrent layer (batch first)."""

    def __init__(self, recurrent: type):
        super().__init__()
        self.recurrent = recurrent(WIDTH, WIDTH, num_layers=2, batch_first=True)

    def forward(self, x):
        return x + self.recurrent(x)[0]


RECURRENT = (nn.LSTM, nn.GRU)


def _make_tied_model(through_module: bool) -> TiedNet:
    torch.manual_seed(0)
    return TiedNet(through_module).double()


def _make_model(dtype=torch.float64, recompute=False) -> Net:
    torch.manual_seed(0)
    return Net(recompute).to(dtype)


def _global_batch(step: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + step)
    inputs = torch.randn(WORLD_SIZE * LOCAL_BATCH, POSITIONS, WIDTH, generator=generator, dtype=torch.float64)
    return inputs.to(dtype), torch.randint(0, CLASSES, (WORLD_SIZE * LOCAL_BATCH,), generator=generator)


def _trainer_data(dtype=torch.float64) -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(64, POSITIONS, WIDTH, generator=generator, dtype=torch.float64)
    return TensorDataset(inputs.to(dtype), torch.randint(0, CLASSES, (64,), generator=generator))


def _adaptive_trainer(model: nn.Module, dtype=torch.float64) -> AdaptiveTrainer:
    """B follows 4 B_simple from 8 up to 32 in multiples of 4 (2 ranks x 2), micro-batches of 2 per process."""
    policy = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32, kappa=4.0, granularity=4, hold_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    return AdaptiveTrainer(model, per_example_cross_entropy, optimizer, _trainer_data(dtype), policy=policy,
                           max_micro_batch=2, lr_coupling="sqrt", monitor_options={"ema_decay": 0.5}, seed=4,
                           progress=False)


# ----------------------------------------------------------------------------------------------- the ranks

def _shard(model: nn.Module, kind: str, mixed_bf16: bool = False, *, block: type = Block,
           world_size: int = WORLD_SIZE, reshard_after_forward: bool | None = None) -> nn.Module:
    """``model.blocks`` (of type ``block``) and the model sharded by ``kind`` (FSDP2: ``reshard_after_forward`` as
    ``fully_shard``'s, whose None reshards every unit but the root)."""
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh("cpu", (world_size,))
        options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
        if mixed_bf16:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **options)
        return fully_shard(model, **options)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({block}),
                                    use_orig_params=kind == "fsdp1_orig")


def _local(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def _plain_fsdp_training(model: nn.Module, rank: int) -> list[torch.Tensor]:
    """FSDP without any monitor: TRAINER_STEPS steps on fixed global batches, 2 micro-batches per rank."""
    from noisescale.sharded import gradient_sync, local_part
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    for step in range(TRAINER_STEPS):
        inputs, labels = (_local(t, rank) for t in _global_batch(step))
        for k, part in enumerate((slice(0, 2), slice(2, 4))):
            with gradient_sync(model, k == 1):
                (F.cross_entropy(model(inputs[part]), labels[part]) * 0.5).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [local_part(p).detach().clone() for p in model.parameters()]


def _monitored_fsdp_training(model: nn.Module, rank: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The same steps through the AccumulatingNoiseScaleMonitor (as AdaptiveTrainer runs them)."""
    from noisescale.sharded import local_part
    from noisescale.training import AccumulatingNoiseScaleMonitor
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    monitor = AccumulatingNoiseScaleMonitor(model, per_example_cross_entropy)
    for step in range(TRAINER_STEPS):
        inputs, labels = (_local(t, rank) for t in _global_batch(step))
        monitor.accumulate([(inputs[:2], labels[:2]), (inputs[2:], labels[2:])])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    monitor.close()
    return [local_part(p).detach().clone() for p in model.parameters()], monitor._rows




def _worker(rank: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=file_rendezvous(out_dir), rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(minutes=30))
    results = {}
    inputs, labels = (_local(t, rank) for t in _global_batch())

    # 1. per-example norms of this rank's shard, float64, with and without activation checkpointing
    for kind in KINDS:
        for recompute in (False, True):
            model = _shard(_make_model(recompute=recompute), kind)
            with PerExampleGradNorms(model, per_example_cross_entropy, by_parameter=True) as norms:
                result = norms(inputs, labels)
            results[f"{kind}_{recompute}_norms"] = result.sqnorms
            results[f"{kind}_{recompute}_by_parameter"] = {n: v.sum().item() for n, v in result.by_parameter.items()}
            results[f"{kind}_{recompute}_grad_sqnorm"] = result.grad_sqnorm

    # 1b. torch's activation-checkpoint wrapper around every block (names gain _checkpoint_wrapped_module)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    for kind in KINDS:
        model = _make_model()
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda module: isinstance(module, Block))
        with PerExampleGradNorms(_shard(model, kind), per_example_cross_entropy, by_parameter=True) as norms:
            result = norms(inputs, labels)
        results[f"{kind}_wrapper_norms"] = result.sqnorms
        results[f"{kind}_wrapper_names"] = sorted(result.by_parameter)

    # 2. bf16 parameters in the forward and backward (FSDP2's MixedPrecisionPolicy), float32 master weights
    model = _shard(_make_model(torch.float32), "fsdp2", mixed_bf16=True)
    with PerExampleGradNorms(model, per_example_cross_entropy) as norms:
        results["bf16_norms"] = norms(inputs.float(), labels).sqnorms

    # 3. training with the monitor leaves the parameters bit-identical to plain FSDP; the history is the global one
    for kind in KINDS:
        results[f"{kind}_plain_params"] = _plain_fsdp_training(_shard(_make_model(), kind), rank)
        params, rows = _monitored_fsdp_training(_shard(_make_model(recompute=True), kind), rank)
        results[f"{kind}_monitored_params"], results[f"{kind}_monitored_rows"] = params, rows

    # 4. the adaptive trainer, and a resume from its checkpoint after half the steps
    for kind in ("fsdp2", "fsdp1_flat"):
        trainer = _adaptive_trainer(_shard(_make_model(), kind))
        with trainer:
            for step in range(TRAINER_STEPS):
                trainer.step()
                if step == TRAINER_STEPS // 2 - 1:
                    checkpoint_state = trainer.state_dict()
        results[f"{kind}_trainer_history"] = trainer.history
        resumed = _adaptive_trainer(_shard(_make_model(), kind))
        with resumed:
            resumed.load_state_dict(checkpoint_state)
            for _ in range(TRAINER_STEPS - TRAINER_STEPS // 2):
                resumed.step()
        results[f"{kind}_resumed_history"] = resumed.history
        results[f"{kind}_checkpoint"] = checkpoint_state

    # 4b. the adaptive trainer with bf16 parameters in FSDP2's forward and backward (float32 master weights)
    trainer = _adaptive_trainer(_shard(_make_model(torch.float32), "fsdp2", mixed_bf16=True), torch.float32)
    with trainer:
        for _ in range(3):
            trainer.step()
    results["bf16_trainer_history"] = trainer.history

    # 5. a module the hooks cannot measure per example (examples not in dim 0) is an error naming its parameters
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
            self.scale = nn.Parameter(torch.ones(WIDTH, dtype=torch.float64))

        def forward(self, x):
            return self.inner(x.transpose(0, 1)).transpose(0, 1).mean(1) * self.scale

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    odd = fully_shard(Transposed().double(), mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
    with PerExampleGradNorms(odd, lambda out, y: out.square().sum(1)) as norms:
        results["unmeasurable_error"] = capture_error(lambda: norms(inputs, labels))
    results["vmap_error"] = capture_error(lambda: PerExampleGradNorms(odd, per_example_cross_entropy, backend="vmap"))
    hooks_before = len(odd._forward_hooks)
    results["hessian_error"] = capture_error(
        lambda: NoiseScaleMonitor(odd, per_example_cross_entropy, hessian_every=5))
    results["hooks_left_by_the_refused_monitor"] = len(odd._forward_hooks) - hooks_before

    # 6. a weight also read outside its layer's call (a tied output): refused in a call and in observe, before
    # the call's backward; the same tie through a module is measured
    for kind in KINDS:
        tied = _shard(_make_tied_model(through_module=False), kind)
        norms = PerExampleGradNorms(tied, per_example_cross_entropy)
        results[f"{kind}_tied_call_error"] = capture_error(lambda: norms(inputs, labels))
        results[f"{kind}_tied_untouched_grads"] = [p.grad is None for p in tied.parameters()]

        def observed_step():
            with norms.observe(LOCAL_BATCH):
                F.cross_entropy(tied(inputs), labels).backward()
        results[f"{kind}_tied_observe_error"] = capture_error(observed_step)
        norms.close()
        with PerExampleGradNorms(_shard(_make_tied_model(through_module=True), kind),
                                 per_example_cross_entropy) as norms:
            results[f"{kind}_tied_through_a_module_norms"] = norms(inputs, labels).sqnorms

    # 7. recurrent layers, measured by their per-module fallback from the parameters the forward saw
    for kind in KINDS:
        for recurrent in RECURRENT:
            torch.manual_seed(0)
            model = _shard(_TwoBlocks(partial(_RecurrentBlock, recurrent)).double(), kind, block=_RecurrentBlock)
            with PerExampleGradNorms(model, per_example_cross_entropy) as norms:
                results[f"{kind}_{recurrent.__name__}_norms"] = norms(inputs, labels).sqnorms

    # 8. a gradient held in one rank's shards alone as accumulate begins: every rank refuses, none enters the pass
    from noisescale.sharded import local_part
    from noisescale.training import AccumulatingNoiseScaleMonitor
    model = _shard(_make_model(recompute=False), KINDS[0])
    F.cross_entropy(model(inputs), labels).backward()
    if rank == 0:
        for p in model.parameters():
            local_part(p.grad).zero_()
    monitor = AccumulatingNoiseScaleMonitor(model, per_example_cross_entropy)
    results["held_error"] = capture_error(lambda: monitor.accumulate([(inputs, labels)]))
    monitor.close()

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()




@pytest.fixture(scope="module")
def rank_results(tmp_path_factory, hang_deadline_s):
    out_dir = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_worker, (str(out_dir),), WORLD_SIZE, out_dir, hang_deadline_s)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


# ----------------------------------------------------------------------------------------------- references

def _reference_sqnorms(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 by a naive loop of backward passes, one example at a time."""
    sqnorms = []
    for i in range(inputs.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(inputs[i:i + 1]), labels[i:i + 1]).backward()
        sqnorms.append(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    return torch.stack(sqnorms)


def _reference_grad_sqnorm(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.zero_grad()
    F.cross_entropy(model(inputs), labels).backward()
    return float(sum(p.grad.square().sum() for p in model.parameters()))


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("kind", KINDS)
def test_per_example_norms_equal_the_unsharded_per_example_loop(rank_results, kind, recompute):
    model = _make_model()
    inputs, labels = _global_batch()
    expected = _reference_sqnorms(model, inputs, labels)
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result[f"{kind}_{recompute}_norms"], _local(expected, rank), rtol=1e-12, atol=0)
        local_inputs, local_labels = _local(inputs, rank), _local(labels, rank)
        assert float(result[f"{kind}_{recompute}_grad_sqnorm"]) == pytest.approx(
            _reference_grad_sqnorm(model, local_inputs, local_labels), rel=1e-12)  # this rank's batch
        names = {name for name, _ in model.named_parameters()}
        assert set(result[f"{kind}_{recompute}_by_parameter"]) == names or kind != "fsdp1_flat"


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpoint_wrapper_gives_the_same_norms(rank_results, kind):
    model = _make_model()
    inputs, labels = _global_batch()
    expected = _reference_sqnorms(model, inputs, labels)
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result[f"{kind}_wrapper_norms"], _local(expected, rank), rtol=1e-12, atol=0)
        if kind == "fsdp1_flat":  # the original parameters, under the unwrapped model's names
            assert result[f"{kind}_wrapper_names"] == sorted(name for name, _ in model.named_parameters())


def test_bf16_mixed_precision_norms_are_within_bf16_error(rank_results):
    inputs, labels = _global_batch()
    expected = _reference_sqnorms(_make_model(), inputs, labels)
    for rank, result in enumerate(rank_results):
        norms = result["bf16_norms"]
        assert norms.dtype == torch.float32
        torch.testing.assert_close(norms.double(), _local(expected, rank), rtol=3e-2, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_monitor_leaves_fsdp_training_bit_identical_and_records_the_global_estimate(rank_results, kind):
    """Activation checkpointing and 2 micro-batches per rank; the history is the per-example estimate of the
    global batch of 8, the same on both ranks, equal to one process on the whole batch (float64)."""
    from noisescale.estimators import simple_noise_scale
    model = _make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    expected = []
    for step in range(TRAINER_STEPS):
        inputs, labels = _global_batch(step)
        expected.append(simple_noise_scale(_reference_sqnorms(model, inputs, labels),
                                           _reference_grad_sqnorm(model, inputs, labels)))
        optimizer.step()  # p.grad holds the mean gradient of the global batch
        optimizer.zero_grad()
    for result in rank_results:
        for plain, monitored in zip(result[f"{kind}_plain_params"], result[f"{kind}_monitored_params"]):
            assert torch.equal(plain, monitored)
        rows = result[f"{kind}_monitored_rows"]
        assert [row["batch_size"] for row in rows] == [WORLD_SIZE * LOCAL_BATCH] * TRAINER_STEPS
        for row, estimate in zip(rows, expected):
            assert row["trace_sigma"] == pytest.approx(estimate.trace_sigma, rel=1e-9)
            assert row["grad_sqnorm"] == pytest.approx(estimate.grad_sqnorm, rel=1e-9)


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1_flat"])
def test_adaptive_fsdp_run_equals_the_single_process_run(rank_results, kind):
    reference = _adaptive_trainer(_make_model())
    with reference:
        for _ in range(TRAINER_STEPS):
            reference.step()
    expected = reference.history
    assert expected["batch_size"].nunique() > 1  # the policy did change B
    for result in rank_results:
        history = result[f"{kind}_trainer_history"]
        assert history["batch_size"].tolist() == expected["batch_size"].tolist()
        assert history["micro_batch_size"].tolist() == [2] * TRAINER_STEPS
        for column in ("learning_rate", "loss", "grad_sqnorm", "trace_sigma", "b_simple", "b_simple_two_batch"):
            np.testing.assert_allclose(history[column], expected[column], rtol=1e-9, err_msg=column)


def test_adaptive_trainer_with_bf16_mixed_precision_is_within_bf16_error(rank_results):
    """3 steps with bf16 parameters in the forward and backward: the same history on both ranks, and the
    per-step estimates within bf16's error of the float64 single-process run."""
    reference = _adaptive_trainer(_make_model())
    with reference:
        for _ in range(3):
            reference.step()
    histories = [result["bf16_trainer_history"] for result in rank_results]
    columns = ["batch_size", "loss", "grad_sqnorm", "trace_sigma"]
    pd.testing.assert_frame_equal(histories[0][columns], histories[1][columns])
    assert histories[0]["batch_size"].tolist() == reference.history["batch_size"].tolist()
    for column in ("loss", "trace_sigma"):
        np.testing.assert_allclose(histories[0][column], reference.history[column], rtol=5e-2, err_msg=column)


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1_flat"])
def test_fsdp_checkpoint_resumes_the_same_run(rank_results, kind):
    """The resumed trainer's steps equal the uninterrupted run's last steps; the checkpoint's model state is the
    full unsharded one with the unsharded model's parameter names."""
    half = TRAINER_STEPS // 2
    for result in rank_results:
        full, resumed = result[f"{kind}_trainer_history"], result[f"{kind}_resumed_history"]
        assert len(resumed) == TRAINER_STEPS
        for column in ("batch_size", "learning_rate", "loss", "b_simple"):
            np.testing.assert_allclose(resumed[column].iloc[half:], full[column].iloc[half:], rtol=1e-12,
                                       err_msg=column)
        state = result[f"{kind}_checkpoint"]["model"]
        assert set(state) == set(_make_model().state_dict())
        assert all(not math.isnan(float(v.sum())) for v in state.values())


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1_flat"])
def test_fsdp_checkpoint_resumes_in_one_process(rank_results, kind):
    """Another world size: rank 0's FSDP checkpoint (full state dicts, parameters by name) continued by one
    process gives the steps of the 2-rank run."""
    half = TRAINER_STEPS // 2
    resumed = _adaptive_trainer(_make_model())
    with resumed:
        resumed.load_state_dict(rank_results[0][f"{kind}_checkpoint"])
        for _ in range(TRAINER_STEPS - half):
            resumed.step()
    full = rank_results[0][f"{kind}_trainer_history"]
    for column in ("batch_size", "learning_rate", "loss", "b_simple"):
        np.testing.assert_allclose(resumed.history[column].iloc[half:], full[column].iloc[half:], rtol=1e-9,
                                   err_msg=column)


def test_a_gradient_held_on_one_rank_alone_is_refused_by_every_rank(rank_results):
    """accumulate's held-gradient check read each rank's own shards: with a gradient in rank 1's shards only, rank
    1 refused while rank 0 went on into the pass's collectives, and the job died (a review's find)."""
    for result in rank_results:
        kind, message = result["held_error"]
        assert kind == "ValueError" and "p.grad already holds a gradient as this step begins" in message


def test_unmeasurable_parameters_are_named_under_fsdp(rank_results):
    for result in rank_results:
        kind, message = result["unmeasurable_error"]
        assert kind == "ValueError" and "inner.0.weight" in message and "FSDP" in message
        kind, message = result["vmap_error"]
        assert kind == "ValueError" and "backend='vmap'" in message
        kind, message = result["hessian_error"]
        assert kind == "ValueError" and "FSDP-sharded" in message and "hessian_every=0" in message
        assert result["hooks_left_by_the_refused_monitor"] == 0


@pytest.mark.parametrize("recurrent", RECURRENT, ids=lambda recurrent: recurrent.__name__)
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_layers_equal_the_unsharded_loop_under_fsdp(rank_results, kind, recurrent):
    """nn.LSTM and nn.GRU (2 layers) in FSDP-wrapped blocks on 2 ranks. Before, they were refused: the per-module
    fallback re-ran them on the module's own parameters, shards by then ("mixed torch.Tensor and DTensor" under
    FSDP2, out-of-bounds storage under FSDP1); it now takes the copies the forward kept."""
    torch.manual_seed(0)
    model = _TwoBlocks(partial(_RecurrentBlock, recurrent)).double()
    inputs, labels = _global_batch()
    expected = _reference_sqnorms(model, inputs, labels)
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result[f"{kind}_{recurrent.__name__}_norms"], _local(expected, rank), rtol=1e-12,
                                   atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_weight_also_read_outside_its_layer_is_refused_under_fsdp_and_a_tie_through_a_module_is_measured(
        rank_results, kind):
    """OLMo's tied output, F.linear(h, embed.weight) outside any module call: without FSDP the whole-model vmap
    measures the embedding's weight; under FSDP it cannot run, and the rule's norm missed that use silently (the
    per-example totals 0.90 to 0.98 of the loop's on a small LM). Now the graph's uses of the unsharded weight are
    counted: a call is refused before its backward (p.grad untouched), observe after the caller's. The tie through
    an nn.Linear sharing the weight is measured, equal to the unsharded loop."""
    inputs, labels = _global_batch()
    expected = _reference_sqnorms(_make_tied_model(through_module=True), inputs, labels)
    for rank, result in enumerate(rank_results):
        for error in (result[f"{kind}_tied_call_error"], result[f"{kind}_tied_observe_error"]):
            assert error[0] == "ValueError" and "embed.weight" in error[1] and "outside their own module" in error[1]
        assert all(result[f"{kind}_tied_untouched_grads"])
        torch.testing.assert_close(result[f"{kind}_tied_through_a_module_norms"], _local(expected, rank),
                                   rtol=1e-12, atol=0)


def test_cli_measure_and_train_run_sharded_under_torchrun(tmp_path, hang_deadline_s):
    """`measure --parallel fsdp` on 2 ranks records the single-process history (same global batches), printed once;
    `train --parallel fsdp --checkpoint` saves a checkpoint whose model state is the unsharded model's."""
    options = ["--steps", "3", "--batch-size", "16", "--hessian-every", "0", "--model", "noisescale.models:mlp"]
    printed = torchrun_noisescale("measure", *options, "--parallel", "fsdp", "--out", str(tmp_path / "fsdp"),
                                  deadline_s=hang_deadline_s)
    assert printed.count("B_simple =") == 1
    assert main(["measure", *options, "--out", str(tmp_path / "single"), "--no-progress"]) == 0
    sharded, single = (pd.read_csv(tmp_path / run / "measure_history.csv") for run in ("fsdp", "single"))
    assert sharded["batch_size"].tolist() == single["batch_size"].tolist() == [16] * 3
    for column in ("loss", "grad_sqnorm", "trace_sigma", "b_simple"):
        pd.testing.assert_series_equal(sharded[column], single[column], rtol=1e-4, check_exact=False)

    checkpoint_path = tmp_path / "train.pt"
    torchrun_noisescale("train", "--schedule", "fixed", "--epochs", "0.1", "--train-examples", "320", "--batch-size",
                        "16", "--model", "noisescale.models:mlp", "--parallel", "fsdp", "--checkpoint",
                        str(checkpoint_path), "--out", str(tmp_path / "train"), deadline_s=hang_deadline_s)
    state = torch.load(checkpoint_path, weights_only=True)["trainer"]["model"]
    torch.manual_seed(0)
    from noisescale.app.options import build_model
    assert {name: tuple(v.shape) for name, v in state.items()} == {
        name: tuple(v.shape) for name, v in build_model("noisescale.models:mlp").state_dict().items()}


def test_cli_measure_under_fsdp_takes_no_hessian_proxies_by_default(tmp_path, capsys):
    """`measure --parallel fsdp` failed on its own default --hessian-every 50, quoted as if given (a new user's
    find); its default is 0 under fsdp now, and a value given is still refused."""
    options = ["measure", "--parallel", "fsdp", "--steps", "2", "--batch-size", "8", "--model",
               "noisescale.models:mlp", "--no-progress", "--json"]
    assert main([*options, "--out", str(tmp_path / "default")]) == 0
    assert json.loads(capsys.readouterr().out)["b_noise_measurements"] == 0
    assert main([*options[:-1], "--out", str(tmp_path / "text")]) == 0   # the text names why B_noise is missing
    assert "B_noise: not measured (--hessian-every 0, the default with --parallel fsdp)" in capsys.readouterr().out
    assert main([*options, "--hessian-every", "50", "--out", str(tmp_path / "given")]) == 2
    assert "--hessian-every '50': must be 0 with --parallel fsdp" in capsys.readouterr().err
    assert main([*options[:1], *options[3:], "--out", str(tmp_path / "ddp")]) == 0   # default 50: step 0 measured
    assert json.loads(capsys.readouterr().out)["b_noise_measurements"] == 1


def test_cli_rejects_hessian_proxies_under_fsdp(tmp_path, capsys):
    assert main(["train", "--schedule", "fixed", "--parallel", "fsdp", "--hessian-every", "5", "--no-progress",
                 "--out", str(tmp_path)]) == 2
    assert "--hessian-every '5': must be 0 with --parallel fsdp" in capsys.readouterr().err


def test_non_reentrant_recomputation_is_not_recorded_twice(monkeypatch):
    """One process: under non-reentrant activation checkpointing every Linear is still measured in ghost form from
    its one recorded call (a second, recomputed record would make it a shared parameter whose per-example
    gradients are materialised), and the norms equal the naive loop."""
    from noisescale.per_example.layers import LinearRule

    def materialised(*args, **kwargs):
        raise AssertionError("per-example gradients were materialised: a recomputed call was recorded")

    monkeypatch.setattr(LinearRule, "per_example_grads", materialised)
    model = _make_model(recompute=True)
    inputs, labels = _global_batch()
    with PerExampleGradNorms(model, per_example_cross_entropy) as norms:
        result = norms(inputs, labels)
    torch.testing.assert_close(result.sqnorms, _reference_sqnorms(_make_model(), inputs, labels), rtol=1e-12, atol=0)


class _AttentionBlock(nn.Module):
    """x + MultiheadAttention(LayerNorm(x)): MHA reads its out_proj's weight and bias without calling out_proj."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class _TwoBlocks(nn.Module):
    """Two blocks made by ``make_block`` and a head on the mean over positions (the one-process FSDP tests)."""

    def __init__(self, make_block):
        super().__init__()
        self.blocks = nn.ModuleList([make_block() for _ in range(2)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(1)


def _assert_one_process_norms_equal_the_loop(model: nn.Module, kind: str, block: type, inputs: torch.Tensor,
                                             labels: torch.Tensor, reshard_after_forward: bool | None = None) -> None:
    """A copy of ``model`` sharded by ``kind`` in one process: a call's norms and observe's equal the loop's."""
    expected = _reference_sqnorms(model, inputs, labels)
    with one_rank_process_group():
        sharded = _shard(copy.deepcopy(model), kind, block=block, world_size=1,
                         reshard_after_forward=reshard_after_forward)
        with PerExampleGradNorms(sharded, per_example_cross_entropy) as norms:
            called = norms(inputs, labels).sqnorms
            with norms.observe(LOCAL_BATCH) as observed:
                F.cross_entropy(sharded(inputs), labels).backward()
    torch.testing.assert_close(called, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(observed.sqnorms, expected, rtol=1e-12, atol=0)


def _one_process_batch() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(LOCAL_BATCH, POSITIONS, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return inputs, torch.arange(LOCAL_BATCH) % CLASSES


@pytest.mark.parametrize("kind", KINDS)
def test_multihead_attention_is_measured_under_fsdp(kind):
    """One process (world size 1): nn.MultiheadAttention in FSDP-wrapped blocks, in a call and in observe, equals the
    per-example loop. Before, FSDP2 raised (the re-run read the module's DTensor shards), and FSDP1 gave out_proj zero
    norms silently: with flat parameters in calls and observe (its names lack the wrappers' path components, and it
    had no copy of them), with use_orig_params=True in observe (only parameters seen receiving a gradient were
    attached to the enclosing MHA call)."""
    torch.manual_seed(0)
    model = _TwoBlocks(_AttentionBlock).double()
    inputs, labels = _one_process_batch()
    _assert_one_process_norms_equal_the_loop(model, kind, _AttentionBlock, inputs, labels)


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_layer_with_as_many_layers_as_examples_is_refused_under_fsdp_with_the_remedy(kind):
    """One process: a 2-layer LSTM's h_n is (2, B, hidden), so with B = 2 its dim 0 cannot be told from the examples'
    dim without the probe on B - 1 examples that FSDP rules out. The refusal says so and how to avoid it (before, it
    said the dim "is not the examples (probe)", though no probe runs under FSDP), and leaves p.grad alone; with B = 4
    the same model equals the per-example loop."""
    torch.manual_seed(0)
    model = _TwoBlocks(lambda: _RecurrentBlock(nn.LSTM)).double()
    inputs, labels = _one_process_batch()
    with one_rank_process_group():
        sharded = _shard(copy.deepcopy(model), kind, block=_RecurrentBlock, world_size=1)
        with PerExampleGradNorms(sharded, per_example_cross_entropy) as norms:
            with pytest.raises(ValueError, match="cannot be told from another dim of that size without a probe on "
                               "one example fewer \\(a batch size unlike the layer's other sizes avoids this\\)"):
                norms(inputs[:2], labels[:2])
            assert all(p.grad is None for p in sharded.parameters())
    _assert_one_process_norms_equal_the_loop(model, kind, _RecurrentBlock, inputs, labels)


class _BiasedBlock(nn.Module):
    """T5's layout: attention scores plus a position bias that the first block computes once for all the examples
    from its own embedding of relative positions and returns, and that each later block takes as an input (two
    more blocks: it passes through two FSDP units' inputs)."""

    def __init__(self, first: bool):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.relative = nn.Embedding(2 * POSITIONS - 1, 1) if first else None

    def forward(self, x, bias=None):
        if self.relative is not None:
            positions = torch.arange(POSITIONS)
            bias = self.relative(positions[None, :] - positions[:, None] + POSITIONS - 1).squeeze(-1)[None]
        scores = self.query(x) @ self.key(x).transpose(1, 2) + bias
        return x + scores.softmax(-1) @ self.value(x), bias


class _BiasedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_BiasedBlock(first=k == 0) for k in range(3)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        bias = None
        for block in self.blocks:
            x, bias = block(x, bias)
        return self.head(x).mean(1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shared_position_bias_passed_between_units_is_measured_under_fsdp(kind):
    """One process: the position bias computed once in the first FSDP unit and passed into the next (as HF T5 does)
    equals the per-example loop, in a call and in observe. Before, FSDP2 refused it: the walk from the shared bias
    to where it meets the examples stopped at FSDP2's identity on the next unit's inputs
    (RegisterPostBackwardFunctionBackward, several outputs)."""
    torch.manual_seed(0)
    _assert_one_process_norms_equal_the_loop(_BiasedNet().double(), kind, _BiasedBlock, *_one_process_batch())


class _LayerScaleBlock(nn.Module):
    """x + scale * W x with ``scale`` a parameter of the block itself (BEiT's and ConvNeXt's layer scale): the FSDP
    unit owns a parameter that no layer with a rule holds, so the block is measured by the per-module fallback."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, WIDTH))

    def forward(self, x):
        return x + self.scale * torch.tanh(self.linear(x))


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_of_the_fsdp_unit_itself_is_measured(kind):
    """One process: blocks that are FSDP units with a parameter of their own (a layer scale) equal the per-example
    loop, in a call and in observe. Before, FSDP2 failed: its post-forward hook on the unit ran before noisescale's
    and resharded the parameters the fallback copies ("mixed torch.Tensor and DTensor"); and the fallback's re-run
    of the unit ran FSDP2's hooks, which put the all-gathered parameters over the re-run's own, so these got zero
    gradients."""
    torch.manual_seed(0)
    _assert_one_process_norms_equal_the_loop(_TwoBlocks(_LayerScaleBlock).double(), kind, _LayerScaleBlock,
                                             *_one_process_batch())


class _RelativeBlock(nn.Module):
    """DeBERTa's layout: the block projects relative embeddings it is given (batch dim 1, made once for all the
    examples) with its own query and key layers, against the examples' keys and queries."""

    def __init__(self):
        super().__init__()
        self.query, self.key = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x, relative):
        query, key, batch = self.query(x), self.key(x), x.shape[0]
        position_query = self.query(relative).expand(batch, -1, -1)   # given to every example, as DeBERTa repeats it
        position_key = self.key(relative).repeat(batch, 1, 1)
        scores = (query + position_query) @ key.transpose(1, 2) + query @ position_key.transpose(1, 2)
        return x + scores.softmax(-1) @ x


class _RelativeNet(nn.Module):
    """Reads its relative embeddings' table as ``.weight`` without calling the embedding, as DeBERTa's encoder
    does, layer-norms it and hands it to every block."""

    def __init__(self):
        super().__init__()
        self.relative, self.norm = nn.Embedding(POSITIONS, WIDTH), nn.LayerNorm(WIDTH)
        self.blocks = nn.ModuleList([_RelativeBlock() for _ in range(2)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        relative = self.norm(self.relative.weight)[None]
        for block in self.blocks:
            x = block(x, relative)
        return self.head(x).mean(1)


@pytest.mark.parametrize("kind", [*KINDS, "fsdp2_root_resharded"])
def test_relative_embeddings_read_as_a_weight_and_passed_into_each_unit(kind):
    """One process: DeBERTa's relative embeddings (a table read as .weight, never called, layer-normed and passed
    into every FSDP unit, where each projects it) equal the per-example loop under FSDP2, in a call and in observe.
    Before, FSDP2 refused them: the table was left to the whole-model vmap (a parameter read outside its module's
    calls was followed only in one process), and the blocks' projections of it were taken for calls on one example
    (the walk stopped at FSDP2's identity on the unit's inputs); and so it did later where the root reshards after
    its forward too (reshard_after_forward=True, torchtitan's setting), since the hook after the model's forward ran
    after FSDP2's, on the table's shard. FSDP1 still refuses them, naming them; p.grad is left untouched."""
    torch.manual_seed(0)
    model = _RelativeNet().double()
    inputs, labels = _one_process_batch()
    if kind.startswith("fsdp2"):
        _assert_one_process_norms_equal_the_loop(model, "fsdp2", _RelativeBlock, inputs, labels,
                                                 reshard_after_forward=True if kind == "fsdp2_root_resharded" else None)
        return
    with one_rank_process_group():
        sharded = _shard(copy.deepcopy(model), kind, block=_RelativeBlock, world_size=1)
        with PerExampleGradNorms(sharded, per_example_cross_entropy) as norms:
            with pytest.raises(ValueError, match=r"relative\.weight'\] cannot be measured on this FSDP-sharded"):
                norms(inputs, labels)
        assert all(p.grad is None for p in sharded.parameters())



def _cross_entropy_with_a_batch_term(outputs, labels):
    """Each example's cross-entropy plus a term of the whole batch's outputs, as an MoE's load-balancing loss is
    added: every loss reads every example."""
    return per_example_cross_entropy(outputs, labels) + 0.5 * outputs.square().mean()


@pytest.mark.parametrize("kind", KINDS)
def test_losses_that_couple_the_examples_are_refused_under_fsdp(kind):
    """One process: a loss with a batch-level term (Mixtral's router loss added to each example's) is refused on a
    call's first pass, with the coupling named, p.grad untouched, and a loss without it is measured after. Before,
    no check ran under FSDP and the call returned norms silently (3.3 % off a new user's Mixtral loop)."""
    torch.manual_seed(0)
    model = _make_model()
    inputs, labels = _one_process_batch()
    with one_rank_process_group():
        sharded = _shard(copy.deepcopy(model), kind, world_size=1)
        with PerExampleGradNorms(sharded, _cross_entropy_with_a_batch_term) as norms:
            with pytest.raises(ValueError, match="the per-example losses are coupled"):
                norms(inputs, labels)
        assert all(p.grad is None for p in sharded.parameters())
    _assert_one_process_norms_equal_the_loop(model, kind, Block, inputs, labels)


def _shard_whole(model: nn.Module, kind: str, units: tuple = ()) -> nn.Module:
    """One process (world size 1): ``model`` sharded by ``kind`` as one unit; under FSDP2 each of ``units`` is a unit
    of its own too."""
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (1,))
        for unit in units:
            fully_shard(unit, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=kind == "fsdp1_orig")


@pytest.mark.parametrize("kind", KINDS)
def test_observe_warns_about_a_term_over_the_batch_in_the_model_s_loss_under_fsdp(kind):
    """One process: observe's walk of the pass's graph from the model's own scalar loss (an MoE-like router's
    load-balancing term over the batch's rows) runs no forward, so it runs under FSDP too: warned about and kept in
    ``coupling``; the same model without the term is not."""
    from test_per_example_coupling import RoutedClassifier

    inputs = (torch.randn(6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
              torch.arange(6) % 3)
    for balance in (0.5, 0.0):
        torch.manual_seed(0)
        model = RoutedClassifier(balance).double()
        with one_rank_process_group():
            sharded = _shard_whole(model, kind)
            with PerExampleGradNorms(sharded, per_example_cross_entropy) as norms:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with norms.observe(6, model_inputs=inputs):
                        sharded(*inputs)["loss"].backward()
        found = [w for w in caught if "term over the whole batch" in str(w.message)]
        assert len(found) == (1 if balance else 0) and (norms.coupling is not None) == bool(balance)


def _observed_micro_batches(kind: str, observe: bool, syncs: tuple[bool, ...]) -> tuple[list[torch.Tensor], list,
                                                                                        int]:
    """One process: a step of micro-batches of a CLIP-like model (its towers and itself sharded by ``kind``), each
    synchronised or not as ``syncs`` says (FSDP2: an unsynchronised one not resharded after its backward either, as
    accelerate does), each in an observe block when ``observe``, then the gradients clipped over
    ``model.parameters()``: (this rank's p.grad, the warnings, the plans built)."""
    from test_per_example_coupling import PairScores, _towers_batch

    from noisescale.sharded import gradient_sync, local_part

    inputs = _towers_batch()
    torch.manual_seed(0)
    model = PairScores().double()
    builds = []
    with one_rank_process_group():
        sharded = _shard_whole(model, kind, units=(model.towers.image,))
        norms = PerExampleGradNorms(sharded, per_example_cross_entropy)
        build = norms._build_plan
        norms._build_plan = lambda: builds.append(1) or build()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for last in syncs:
                if kind == "fsdp2":
                    sharded.set_reshard_after_backward(last)
                with gradient_sync(sharded, last):
                    with norms.observe(6, model_inputs=inputs) if observe else contextlib.nullcontext():
                        F.cross_entropy(sharded(*inputs)["scores"], torch.arange(6)).backward()
            torch.nn.utils.clip_grad_norm_(sharded.parameters(), 0.1)
        norms.close()
        grads = [local_part(p.grad).clone() for p in sharded.parameters()]
    return grads, [w for w in caught if "couples the examples" in str(w.message)], len(builds)


@pytest.mark.parametrize("kind", KINDS)
def test_observe_checks_the_outputs_under_fsdp_and_leaves_the_step_as_it_was(kind):
    """One process: observe's independence check (two forwards in eval mode after the caller's pass) runs under
    FSDP too, and names CLIP-like (B, B) scores that couple the examples. Before, nothing ran under FSDP. Its
    forwards leave the model as they found it: over a step of one micro-batch and one of two, with the gradients
    clipped over model.parameters(), p.grad equals a plain FSDP run's bit for bit. A first version left FSDP2's root, which it
    does not reshard after a forward, unsharded: model.parameters() then held the unsharded parameters, without
    gradients, and the HF Trainer's clipping read less (its logged grad norm went from 0.67 to 0.40). The plan is
    built once: FSDP2 registers its unsharded parameters in the shards' place between micro-batches, which rebuilt
    it (and ran its first-pass checks again) on every micro-batch."""
    for syncs in ((True,), (False, True)):   # the check after the step's backward, and between micro-batches
        plain, _, _ = _observed_micro_batches(kind, False, syncs)
        observed, caught, builds = _observed_micro_batches(kind, True, syncs)
        assert len(caught) == 1 and "['scores']" in str(caught[0].message)
        assert builds == 1
        assert all(torch.equal(a, b) for a, b in zip(observed, plain))


class _WeightReadingBlock(nn.Module):
    """A module with no rule whose forward reads its nn.Linear's weight and bias without calling it (when ``read``),
    beside a layer it calls; ``unused`` is never read at all. ``nested``: the nn.Linear sits in a container module
    that is never called either (``self.holder.proj``)."""

    def __init__(self, read: bool, nested: bool = False):
        super().__init__()
        self.read, self.nested = read, nested
        if nested:
            self.holder = nn.Module()
            self.holder.proj = nn.Linear(WIDTH, WIDTH)
        else:
            self.proj = nn.Linear(WIDTH, WIDTH)
        self.gate = nn.Linear(WIDTH, WIDTH)
        self.unused = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        proj = self.holder.proj if self.nested else self.proj
        h = x @ proj.weight.T + proj.bias if self.read else x
        return x + torch.tanh(h) * torch.sigmoid(self.gate(x))


@pytest.mark.parametrize("nested", [False, True], ids=["child", "grandchild"])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_read_without_its_layer_call_is_refused_under_fsdp(kind, nested):
    """One process (world size 1): a module with no rule reading its nn.Linear's weight without calling the layer
    (x @ self.proj.weight.T) needs the whole-model vmap, which cannot run under FSDP: refused in a call and in
    observe, naming the weight. Before, proj's norms were zeros silently under all three FSDP kinds (per-example
    totals 0.85-0.88 of the loop's; unsharded, the vmap measures them), and stayed so where the layer sat in a
    container module never called (x @ self.holder.proj.weight.T). A layer never read keeps zero norms, without a
    refusal."""
    torch.manual_seed(0)
    inputs, labels = _one_process_batch()
    with one_rank_process_group():
        sharded = _shard(_TwoBlocks(partial(_WeightReadingBlock, True, nested)).double(), kind,
                         block=_WeightReadingBlock, world_size=1)
        refusal = r"blocks\.0\.(_fsdp_wrapped_module\.)?(holder\.)?proj\.weight.*cannot be measured"
        with PerExampleGradNorms(sharded, per_example_cross_entropy) as norms:
            with pytest.raises(ValueError, match=refusal):
                norms(inputs, labels)
            with pytest.raises(ValueError, match=refusal):
                with norms.observe(LOCAL_BATCH):
                    F.cross_entropy(sharded(inputs), labels).backward()
    model = _TwoBlocks(partial(_WeightReadingBlock, False, nested)).double()
    _assert_one_process_norms_equal_the_loop(model, kind, _WeightReadingBlock, inputs, labels)


class _ReadsAnotherUnit(_TwoBlocks):
    """The model's forward reads block 0's up.weight, which block 0's call used, after that call, when FSDP has
    resharded it."""

    def forward(self, x):
        x = self.blocks[0](x)
        x = self.blocks[1](x) + torch.tanh(F.linear(x, self.blocks[0].up.weight)).mean(-1, keepdim=True)
        return self.head(x).mean(1)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_of_another_unit_read_after_it_resharded_is_refused(kind):
    """One process (world size 1): the root reads a weight of another FSDP unit after that unit's call, which
    needs the whole-model vmap: refused in a call (p.grad untouched) and in observe, naming the weight. Before,
    FSDP1 with use_orig_params=True (whose resharded view is the whole weight at world size 1) gave per-example
    norms 0.75 % off the loop here silently (3.6 % and 11 % on a trial's two models). FSDP2 cannot run this model
    unless its units keep their parameters after the forward (reshard_after_forward=False; resharded, it reads a
    DTensor shard and torch raises); FSDP1 with flat parameters was refused before too."""
    torch.manual_seed(0)
    inputs, labels = _one_process_batch()
    with one_rank_process_group():
        sharded = _shard(_ReadsAnotherUnit(partial(Block, False)).double(), kind, world_size=1,
                         reshard_after_forward=False)
        refusal = r"blocks\.0\.(_fsdp_wrapped_module\.)?up\.weight'\] cannot be measured"
        with PerExampleGradNorms(sharded, per_example_cross_entropy) as norms:
            with pytest.raises(ValueError, match=refusal):
                norms(inputs, labels)
            assert all(p.grad is None for p in sharded.parameters())
            with pytest.raises(ValueError, match=refusal):
                with norms.observe(LOCAL_BATCH):
                    F.cross_entropy(sharded(inputs), labels).backward()


def test_tensor_parallel_parameters_are_refused_with_a_clear_error():
    """One process (world size 1): a model made tensor parallel by parallelize_module (DTensor weights, no FSDP
    module), as Lightning's ModelParallelStrategy with tensor_parallel_size > 1 makes it, is refused when the norms
    are set up, naming its parameters. Before, NoiseScaleCallback and PerExampleGradNorms accepted it and the first
    call failed inside the ghost hooks with "aten.bitwise_and_.Tensor got mixed torch.Tensor and DTensor"."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    with one_rank_process_group():
        model = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Tanh(), nn.Linear(2 * WIDTH, CLASSES)).double()
        parallelize_module(model, init_device_mesh("cpu", (1,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
        with pytest.raises(ValueError, match=r"0\.weight, 0\.bias, 2\.weight, 2\.bias are DTensors.*tensor parallel"):
            PerExampleGradNorms(model, per_example_cross_entropy)
