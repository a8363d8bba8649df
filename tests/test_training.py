"""AdaptiveTrainer: accumulation equals the big batch, exact resume, OOM retry, B <= B_max, every example once per
epoch, the schedules' B and LR, the noise-adaptive policy, and the `noisescale train` command."""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from noisescale.app.cli import main
from noisescale.controller import BatchSizeSchedule, NoiseScaleBatchPolicy, NoiseScalePolicyState
from noisescale.hessian import micro_batch_hessian_noise_scale
from noisescale.sampler import ResizableBatchSampler
from noisescale.training import AdaptiveTrainer, is_out_of_memory


def per_example_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def per_example_squared_error(outputs, targets):
    return (outputs.squeeze(1) - targets).square()


def classification_data(n: int = 96, features: int = 6, classes: int = 3, seed: int = 0,
                        dtype=torch.float64) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator, dtype=dtype)
    weights = torch.randn(features, classes, generator=generator, dtype=dtype)
    targets = (inputs @ weights + 0.5 * torch.randn(n, classes, generator=generator, dtype=dtype)).argmax(1)
    return TensorDataset(inputs, targets)


def small_net(seed: int = 0, dropout: float = 0.0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 8), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))  # consumes the global RNG: resume must restore it
    layers.append(torch.nn.Linear(8, 3))
    return torch.nn.Sequential(*layers).to(dtype)


def make_trainer(model, dataset, *, lr=0.1, momentum=0.0, loss_fn=per_example_cross_entropy, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    options.setdefault("progress", False)
    return AdaptiveTrainer(model, loss_fn, optimizer, dataset, **options)


def parameters_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("max_micro_batch", [4, None], ids=["micro_batches", "one_micro_batch"])
def test_an_optimizer_over_the_head_alone_measures_every_step_from_that_steps_gradient(max_micro_batch):
    """An optimizer over a fine-tuned head while the backbone still requires grad: the trainer cleared the
    optimizer's p.grad only, so the backbone's added up over steps; with micro-batches the |G|^2 read from the
    accumulated p.grad took them in (step 1: 0.49 for 0.15, silently, then an error blaming a summed loss), and the
    held-gradient check refused one micro-batch at step 1 (a survey's finds). Every step's tr(Sigma) and |G|^2 are
    now those of a loop over single examples at that step's parameters (the batch is the whole dataset)."""
    dataset, model = classification_data(n=12), small_net()
    trainer = AdaptiveTrainer(model, per_example_cross_entropy, torch.optim.SGD(model[2].parameters(), lr=0.5),
                              dataset, batch_size=12, max_micro_batch=max_micro_batch, progress=False)
    inputs, targets = dataset.tensors
    for _ in range(3):
        reference = copy.deepcopy(model)
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            per_example_cross_entropy(reference(inputs[i:i + 1]), targets[i:i + 1]).sum(),
            list(reference.parameters()))]) for i in range(12)])
        mean = grads.mean(0)   # the batch is the dataset: its tr(Sigma) and |G|^2 exactly (population_size = N)
        row = trainer.step()
        assert row["trace_sigma"] == pytest.approx(float((grads - mean).square().sum(1).mean()), rel=1e-10)
        assert row["grad_sqnorm"] == pytest.approx(float(mean.square().sum()), rel=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_a_grad_scaler_step_equals_a_plain_step():
    """The fp16 path's loss scaling, with a CPU GradScaler in place of the CUDA one: the scaled, accumulated
    gradients are unscaled by scaler.step, so two steps move the parameters as without a scaler."""
    dataset = classification_data()
    plain_model, scaled_model = small_net(), small_net()
    plain = make_trainer(plain_model, dataset, batch_size=16, max_micro_batch=8, seed=1)
    scaled = make_trainer(scaled_model, dataset, batch_size=16, max_micro_batch=8, seed=1)
    scaled.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(2):
        plain_row, scaled_row = plain.step(), scaled.step()
        assert scaled_row["b_simple"] == pytest.approx(plain_row["b_simple"], rel=1e-9)
    for expected, actual in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_accumulated_micro_batches_give_the_full_batch_gradient_and_noise_scale():
    """One SGD step (lr 1) with micro-batches [5, 4, 4, 4] moves the parameters by the full batch's mean
    gradient; the recorded |G|^2 and tr(Sigma) equal a naive per-example loop over the whole batch."""
    dataset = classification_data()
    model = small_net()
    start = parameters_of(model)
    trainer = make_trainer(model, dataset, lr=1.0, batch_size=17, max_micro_batch=5, seed=3)
    indices = next(iter(type(trainer.sampler)(len(dataset), 17, seed=3)))
    row = trainer.step()
    assert row["micro_batches"] == 4

    reference = small_net()
    inputs, targets = dataset[torch.tensor(indices)]
    per_example = []
    for x, y in zip(inputs, targets):
        grads = torch.autograd.grad(per_example_cross_entropy(reference(x[None]), y[None]).sum(),
                                    list(reference.parameters()))
        per_example.append(torch.cat([g.reshape(-1) for g in grads]))
    per_example = torch.stack(per_example)
    mean_gradient = per_example.mean(0)
    offset = 0
    for before, after in zip(start, model.parameters()):
        size = before.numel()
        torch.testing.assert_close(after.detach(), before - mean_gradient[offset:offset + size].view_as(before),
                                   rtol=0, atol=1e-13)
        offset += size
    batch, population = 17, len(dataset)   # drawn without replacement from the dataset: its finite-population form
    noise = batch / (batch - 1) * (per_example.square().sum(1).mean() - mean_gradient.square().sum())
    trace_sigma = noise * (population - 1) / population
    grad_sqnorm = mean_gradient.square().sum() - noise / batch + noise / population
    assert row["trace_sigma"] == pytest.approx(trace_sigma.item(), rel=1e-10)
    assert row["grad_sqnorm"] == pytest.approx(grad_sqnorm.item(), rel=1e-10)
    # the micro-batches' own estimate, (sum_k b_k |g_k|^2 - B |g|^2) / (K - 1), from their naive mean gradients
    micro = [per_example[k:k + b].mean(0) for k, b in zip((0, 5, 9, 13), (5, 4, 4, 4))]
    trace_sigma_micro = (sum(b * g.square().sum() for b, g in zip((5, 4, 4, 4), micro))
                         - batch * mean_gradient.square().sum()) / 3
    assert row["trace_sigma_two_batch"] == pytest.approx(trace_sigma_micro.item() * (population - 1) / population,
                                                         rel=1e-10)
    assert row["grad_sqnorm_two_batch"] == pytest.approx(
        (mean_gradient.square().sum() - trace_sigma_micro / batch + trace_sigma_micro / population).item(), rel=1e-10)


def test_two_batch_estimate_from_equal_micro_batches_matches_a_naive_reference():
    """Micro-batches of 4 in a batch of 16: tr(Sigma) = (mean_k |g_k|^2 - |g|^2) / (1/4 - 1/16) and
    |G|^2 = (16 |g|^2 - 4 mean_k |g_k|^2) / 12, with g_k the micro-batch mean gradients computed naively."""
    dataset = classification_data()
    trainer = make_trainer(small_net(), dataset, batch_size=16, max_micro_batch=4, seed=1)
    indices = next(iter(type(trainer.sampler)(len(dataset), 16, seed=1)))
    row = trainer.step()
    reference = small_net()
    inputs, targets = dataset[torch.tensor(indices)]

    def mean_gradient(x, y):
        grads = torch.autograd.grad(per_example_cross_entropy(reference(x), y).mean(), list(reference.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    micro = torch.stack([mean_gradient(inputs[k:k + 4], targets[k:k + 4]) for k in range(0, 16, 4)])
    small, big = micro.square().sum(1).mean(), micro.mean(0).square().sum()
    noise, population = ((small - big) / (1 / 4 - 1 / 16)).item(), len(dataset)   # drawn without replacement
    assert row["trace_sigma_two_batch"] == pytest.approx(noise * (population - 1) / population, rel=1e-10)
    assert row["grad_sqnorm_two_batch"] == pytest.approx(((16 * big - 4 * small) / 12).item() + noise / population,
                                                         rel=1e-10)


def batch_norm_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def test_a_batch_norm_model_is_measured_from_its_micro_batches_and_trained_as_a_plain_accumulation():
    """BatchNorm in train mode couples a batch's examples (no per-example gradient): each micro-batch, normalised
    by its own statistics, is the unit. Two steps of B = 10 in micro-batches [4, 3, 3]: the parameters and running
    statistics equal a plain accumulation loop's bit for bit, and tr(Sigma) and |G|^2 equal
    (sum_k b_k |g_k|^2 - B |g|^2) / (K - 1) and |g|^2 - tr(Sigma)/B from each micro-batch's gradient taken alone."""
    dataset = classification_data()
    model, reference = batch_norm_net(), batch_norm_net()
    trainer = make_trainer(model, dataset, batch_size=10, max_micro_batch=4, seed=3)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = iter(type(trainer.sampler)(len(dataset), 10, seed=3))
    for _ in range(2):
        inputs, targets = dataset[torch.tensor(next(batches))]
        row = trainer.step()
        assert row["micro_batches"] == 3
        gradients = []
        reference_optimizer.zero_grad()
        for start, size in zip((0, 4, 7), (4, 3, 3)):
            x, y = inputs[start:start + size], targets[start:start + size]
            grads = torch.autograd.grad(per_example_cross_entropy(reference(x), y).mean(), list(reference.parameters()))
            gradients.append(torch.cat([g.reshape(-1) for g in grads]))
            for p, g in zip(reference.parameters(), grads):
                p.grad = g * (size / 10) if p.grad is None else p.grad + g * (size / 10)
        batch_gradient = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        reference_optimizer.step()
        noise = (sum(b * g.square().sum() for b, g in zip((4, 3, 3), gradients))
                 - 10 * batch_gradient.square().sum()).item() / 2
        population = len(dataset)   # the finite-population form of batches drawn without replacement
        assert row["trace_sigma"] == pytest.approx(noise * (population - 1) / population, rel=1e-10)
        assert row["grad_sqnorm"] == pytest.approx(batch_gradient.square().sum().item() - noise / 10
                                                   + noise / population, rel=1e-10)
        assert "trace_sigma_two_batch" not in row   # the micro-batches are the estimate itself
    for (name, actual), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15, msg=name)


def test_a_batch_norm_model_in_one_micro_batch_records_no_estimate_and_says_how_to_get_one():
    trainer = make_trainer(batch_norm_net(), classification_data(), batch_size=10, seed=3)
    with pytest.warns(RuntimeWarning, match="set max_micro_batch below the batch size"):
        row = trainer.step()
    assert math.isnan(row["trace_sigma"]) and "b_simple" not in row
    with pytest.raises(ValueError, match="set hessian_every=0"):   # B_noise needs per-example gradients
        make_trainer(batch_norm_net(), classification_data(), batch_size=10, max_micro_batch=4,
                     monitor_options={"hessian_every": 1})


def test_a_policy_on_a_batch_norm_model_whose_batch_runs_as_one_micro_batch_is_refused():
    """Such a run records no noise scale, and the policy holds B on it: before, a noise-adaptive run of a BatchNorm
    model without max_micro_batch kept its first B for the whole run with one warning (a new user's CLI run)."""
    def trainer(max_micro_batch):
        policy = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32, hold_steps=1)
        return make_trainer(batch_norm_net(), classification_data(), policy=policy, max_micro_batch=max_micro_batch)

    for max_micro_batch in (None, 8, 16):
        with pytest.raises(ValueError, match="set max_micro_batch below 8"):
            trainer(max_micro_batch)
    assert trainer(4).step()["micro_batches"] == 2   # split: measured
    model = batch_norm_net()
    model[1].eval()   # running statistics: per-example gradients, no micro-batches needed
    make_trainer(model, classification_data(), policy=NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32))


# --------------------------------------------------------------------------- checkpoints and faults


def noise_adaptive_trainer(seed_of_model: int = 0, max_micro_batch: int | None = 6, dropout: float = 0.2,
                           lr_coupling: str = "sqrt", initial_batch_size: int = 4):
    model = small_net(seed_of_model, dropout=dropout)
    policy = NoiseScaleBatchPolicy(initial_batch_size, min_batch_size=4, max_batch_size=32, hold_steps=2, kappa=2.0)
    trainer = make_trainer(model, classification_data(), lr=0.2, momentum=0.9, policy=policy,
                           lr_coupling=lr_coupling, max_micro_batch=max_micro_batch, seed=5)
    return model, trainer


@pytest.mark.parametrize("lr_coupling", ["sqrt", "adascale"])
def test_resume_from_a_checkpoint_continues_the_run_identically(lr_coupling):
    """Also with AdaScale's factor, recomputed at every step from the checkpointed averages and B_0 (the resumed
    trainer's policy is even built at another initial batch size: B_0 is the checkpoint's)."""
    model, trainer = noise_adaptive_trainer(lr_coupling=lr_coupling)
    trainer.train(epochs=3)
    assert trainer.history["batch_size"].nunique() > 1  # the policy changed B during the run
    assert trainer.history["learning_rate"].nunique() > 2

    interrupted_model, interrupted = noise_adaptive_trainer(lr_coupling=lr_coupling)
    interrupted.train(epochs=1.5)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    torch.rand(7)  # the global RNG moves on in between; the checkpoint restores it
    resumed_model, resumed = noise_adaptive_trainer(seed_of_model=1, lr_coupling=lr_coupling,
                                                    initial_batch_size=8)  # different initial weights
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # plain types: no code can run on load
    resumed.train(epochs=3)
    for expected, actual in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(expected, actual)
    pd.testing.assert_frame_equal(trainer.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))


def test_a_refused_checkpoint_leaves_the_trainer_as_it_was():
    """A checkpoint of another sampler seed was refused only after the model and the optimizer had been loaded (an
    audit's finding: the trainer half-loaded). Now every part is as before the call, and training goes on exactly as
    a trainer that was never asked. Reference: the same trainer without the refused load."""
    _, saved = noise_adaptive_trainer()
    saved.train(epochs=0.5)
    state = copy.deepcopy(saved.state_dict())
    state["sampler"]["seed"] = 6   # another run's
    runs = []
    for refused in (False, True):
        model, trainer = noise_adaptive_trainer(seed_of_model=1)
        trainer.train(epochs=0.5)
        if refused:
            with pytest.raises(ValueError, match="seed=6 but this sampler has 5"):
                trainer.load_state_dict(state)
        trainer.train(epochs=1)
        runs.append((parameters_of(model), trainer.history.drop(columns="seconds"), trainer.optimizer.state_dict()))
    (plain, plain_history, plain_optimizer), (kept, kept_history, kept_optimizer) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain, kept))
    pd.testing.assert_frame_equal(plain_history, kept_history)
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(plain_optimizer["state"].values(), kept_optimizer["state"].values()))

def test_a_resumed_trainer_keeps_its_own_max_micro_batch():
    """Resuming on a smaller GPU: the new trainer's max_micro_batch is kept (the checkpoint's replaced it, so a
    resume could not lower it); without one it is the checkpoint's. The run continues as the uninterrupted one,
    up to accumulation's rounding (float64; no dropout, whose masks are drawn per micro-batch)."""
    model, trainer = noise_adaptive_trainer(dropout=0.0)
    trainer.train(epochs=3)
    interrupted_model, interrupted = noise_adaptive_trainer(dropout=0.0)
    interrupted.train(epochs=1.5)
    state = interrupted.state_dict()
    for given, kept in ((3, 3), (None, 6)):
        resumed_model, resumed = noise_adaptive_trainer(seed_of_model=1, max_micro_batch=given, dropout=0.0)
        resumed.load_state_dict(copy.deepcopy(state))   # (the optimizer would share the state's tensors)
        assert resumed.max_micro_batch == kept
        resumed.train(epochs=3)
        for expected, actual in zip(model.parameters(), resumed_model.parameters()):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        assert resumed.history["batch_size"].tolist() == trainer.history["batch_size"].tolist()


def test_resuming_with_other_optimizer_settings_warns_and_continues_with_the_checkpoints():
    """A trainer built with lr 0.05 and momentum 0.5 resumes a checkpoint of lr 0.2 and momentum 0.9: a warning
    names both, and the run continues as the checkpointed one (before, silently). Equal settings do not warn,
    also for AdamW under OneCycleLR, which moves its betas during the run (a new user's false warning)."""
    def policy():
        return NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=32, hold_steps=2, kappa=2.0)

    model, trainer = noise_adaptive_trainer(dropout=0.0)
    trainer.train(epochs=2)
    _, interrupted = noise_adaptive_trainer(dropout=0.0)
    interrupted.train(epochs=1)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    resumed_model = small_net(1)
    resumed = make_trainer(resumed_model, classification_data(), lr=0.05, momentum=0.5, policy=policy(),
                           lr_coupling="sqrt", max_micro_batch=6, seed=5)
    buffer.seek(0)
    with pytest.warns(UserWarning, match=r"group 0: lr 0.2 \(this trainer: 0.05\); group 0: momentum 0.9 "
                                         r"\(this trainer: 0.5\)"):
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.train(epochs=2)
    for expected, actual in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(expected, actual)

    def adam_trainer():
        net = small_net(0)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10, cycle_momentum=True)
        trainer = AdaptiveTrainer(net, per_example_cross_entropy, optimizer, classification_data(), policy=policy(),
                                  progress=False)
        return trainer, scheduler

    adam, scheduler = adam_trainer()
    for _ in range(2):
        adam.step()
        scheduler.step()
    assert adam.optimizer.param_groups[0]["betas"] != adam.base_settings[0]["betas"]
    buffer = io.BytesIO()
    torch.save(adam.state_dict(), buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adam_trainer()[0].load_state_dict(torch.load(buffer, weights_only=True))


def test_a_tensor_learning_rate_is_coupled_in_place():
    """Adam with a tensor lr (as fused and capturable Adam take) under a policy with linear coupling: the lr stays
    the optimizer's tensor and follows B in each optimizer step (a new user's run stopped with "learning_rate must
    be a real number"), and holds the user's rate between steps."""
    model = linear_model()
    learning_rate = torch.tensor(0.01, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    used = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(float(opt.param_groups[0]["lr"])))
    policy = NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=64, hold_steps=1, max_factor=2.0)
    trainer = AdaptiveTrainer(model, per_example_squared_error, optimizer, regression_data(3.0), policy=policy,
                              lr_coupling="linear", progress=False)
    history = trainer.train(epochs=1)
    assert history["batch_size"].nunique() > 1 and optimizer.param_groups[0]["lr"] is learning_rate
    ratio = history["learning_rate"] / history["batch_size"]
    assert ratio.to_numpy() == pytest.approx(0.01 / 4, rel=1e-12)
    assert used == history["learning_rate"].tolist() and learning_rate.item() == 0.01


def plain_types_in(value, path="state") -> set[str]:
    """The paths of every value in a nested state that is not a tensor or a plain Python type."""
    if isinstance(value, dict):
        return set().union(*(plain_types_in(item, f"{path}/{key}") for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return set().union(*(plain_types_in(item, f"{path}[]") for item in value))
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return set()
    return {f"{path}: {type(value).__module__}.{type(value).__name__}"}


def test_state_dict_holds_only_tensors_and_plain_types_and_loads_with_weights_only():
    """History rows (b_simple interval, two-batch and Hessian columns included), policy, sampler, monitor and
    RNG states: nothing that needs an unsafe unpickler."""
    model = small_net()
    policy = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32, hold_steps=2, granularity=4)
    trainer = make_trainer(model, classification_data(), policy=policy, max_micro_batch=4, seed=2,
                           monitor_options={"hessian_every": 2, "hessian_examples": 4, "hessian_probes": 2})
    trainer.train(epochs=1)
    assert {"b_simple_low", "b_simple_two_batch", "b_noise", "skipped"} <= set(trainer.history.columns)
    state = trainer.state_dict()
    assert plain_types_in(state) == set()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    pd.testing.assert_frame_equal(pd.DataFrame(loaded["history"]), trainer.history)


def test_a_non_finite_step_is_skipped_counted_and_warned_once():
    """Examples with NaN features: their steps take no optimizer step (parameters and momentum as they were),
    the rows are marked skipped, a warning comes once; the other steps train as usual."""
    dataset = classification_data()
    inputs, targets = dataset.tensors
    inputs = inputs.clone()
    trainer = make_trainer(small_net(), TensorDataset(inputs, targets), momentum=0.9, batch_size=16, seed=4,
                           monitor_options={"measure_every": 2})
    batches = list(type(trainer.sampler)(len(dataset), 16, seed=4))  # the first epoch's batches
    inputs[batches[1][3]] = math.nan  # in step 1 (not measured)
    inputs[batches[2][5]] = math.nan  # in step 2 (measured)
    trainer.step()
    before = parameters_of(trainer.model)
    momentum = [trainer.optimizer.state[p]["momentum_buffer"].clone() for p in trainer.model.parameters()]
    with pytest.warns(RuntimeWarning, match="optimizer step is skipped"):
        first_skipped = trainer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once only
        warnings.filterwarnings("ignore", message=".*non-finite loss or gradient.*")  # the monitor's own warning
        second_skipped = trainer.step()
        after_skips = parameters_of(trainer.model)
        momentum_after_skips = [trainer.optimizer.state[p]["momentum_buffer"].clone()
                                for p in trainer.model.parameters()]
        trained = trainer.step()
    assert first_skipped["skipped"] and second_skipped["skipped"] and not trained["skipped"]
    assert trainer.skipped_steps == 2
    for expected, actual in zip(before, after_skips):
        assert torch.equal(expected, actual)
    for expected, actual in zip(momentum, momentum_after_skips):
        assert torch.equal(expected, actual)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert not torch.equal(after_skips[0], trainer.model[0].weight)  # the finite step did train
    assert trainer.history["skipped"].tolist() == [False, True, True, False]


def test_a_batch_holding_nan_is_reported_as_bad_data_not_as_a_diverged_run():
    """NaN features in 5 examples of the last step's batch of 16, run as micro-batches of 4: the step is skipped,
    the warnings name the data with the count over the whole batch, and the summary reports the noise scale of the
    reference run without that step, with a warning about the data (before: "the run diverged (the loss or
    gradient of the latest step (5) is not finite) ...; lower the learning rate")."""
    dataset = classification_data()
    inputs, targets = dataset.tensors
    trainer = make_trainer(small_net(), TensorDataset(inputs.clone(), targets), batch_size=16, max_micro_batch=4)
    reference = make_trainer(small_net(), dataset, batch_size=16, max_micro_batch=4)
    last_batch = list(type(trainer.sampler)(len(dataset), 16, seed=0))[5]
    trainer.dataset.tensors[0][last_batch[3:8], 1] = math.nan
    for _ in range(5):
        trainer.step()
        reference.step()
    named = "NaN in its inputs (5 values)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = trainer.step()
    monitor_warning, trainer_warning = (str(warning.message) for warning in caught)
    assert monitor_warning.startswith(f"step 5: the batch holds {named}: check the data")
    assert trainer_warning == (f"step 5: the batch holds {named}; the optimizer step is skipped (as GradScaler does) "
                               "and its history row is marked skipped; trainer.skipped_steps counts such steps (warned "
                               "once). Check the data (remove or fix those values): the learning rate is not the cause")
    assert row["skipped"] and row["nonfinite_data"] == named and trainer.history["nonfinite_data"].iloc[-1] == named
    summary, expected = trainer.monitor.summary(), reference.monitor.summary()
    assert summary.divergence is None and summary.bad_data == f"the batch of step 5 holds {named}"
    assert summary.suggested_batch_size == pytest.approx(expected.suggested_batch_size, nan_ok=True)
    assert "diverged" not in str(summary)
    for expected_parameter, parameter in zip(reference.model.parameters(), trainer.model.parameters()):
        assert torch.equal(expected_parameter, parameter)


def test_a_loss_non_finite_from_the_first_step_is_not_blamed_on_the_learning_rate():
    """A loss that is not finite for some examples of every batch (here a division by a count that is 0 for the
    examples of class 0, on finite data) skipped every step with "If it keeps happening the run has diverged: lower
    the learning rate", though no step had moved the parameters. Now the skip names the examples and says no step
    has been finite yet."""
    def broken_loss(outputs, targets):
        return per_example_cross_entropy(outputs, targets) / (targets != 0)

    model = small_net()
    before = parameters_of(model)
    trainer = make_trainer(model, classification_data(), loss_fn=broken_loss, batch_size=16, max_micro_batch=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [trainer.step() for _ in range(3)]
    first = rows[0]["nonfinite_examples"]
    assert first.startswith("the loss of ") and "of its 16 examples is not finite (ind" in first
    # (the token-mean check of the split step, left with too few finite examples to compare, says so too)
    texts = [str(w.message) for w in caught if "could not check whether loss_fn" not in str(w.message)]
    assert len(texts) == 2 and "no run diverges before a finite step" in texts[0]
    assert texts[1] == (f"step 0: the loss or gradient is not finite ({first}); the optimizer step is skipped (as "
                        "GradScaler does) and its history row is marked skipped; trainer.skipped_steps counts such "
                        "steps (warned once). No step has been finite yet: the model or the loss computes a "
                        "non-finite value on this data, not the learning rate (the monitor's summary says more)")
    assert all(row["skipped"] for row in rows) and all(map(torch.equal, before, model.parameters()))
    assert trainer.monitor.summary().nonfinite_from_start is not None


@pytest.mark.filterwarnings("ignore:.*non-finite:RuntimeWarning", "ignore:.*optimizer step is skipped:RuntimeWarning")
def test_a_skipped_step_puts_the_batch_norm_running_statistics_back():
    """A NaN example's forward makes every BatchNorm running mean and variance NaN; the skipped step puts them back
    (before, they stayed NaN and eval-mode outputs were NaN for good), whether the step was measured or not."""
    dataset = classification_data()
    inputs, targets = dataset.tensors
    inputs = inputs.clone()
    trainer = make_trainer(batch_norm_net(), TensorDataset(inputs, targets), batch_size=8, max_micro_batch=4,
                           seed=4, monitor_options={"measure_every": 2})
    batches = list(type(trainer.sampler)(len(dataset), 8, seed=4))
    inputs[batches[1][3]] = math.nan   # step 1, not measured
    inputs[batches[2][5]] = math.nan   # step 2, measured (by micro-batches)
    trainer.step()
    statistics = {name: b.clone() for name, b in trainer.model.named_buffers()}
    assert trainer.step()["skipped"] and trainer.step()["skipped"]
    for name, buffer in trainer.model.named_buffers():
        assert torch.equal(buffer, statistics[name]), name
    assert not trainer.step()["skipped"]
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers())
    trainer.model.eval()
    assert torch.isfinite(trainer.model(inputs[batches[0]])).all()


@pytest.mark.filterwarnings("ignore:.*non-finite loss or gradient:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:.*optimizer step is skipped:RuntimeWarning")
def test_a_skipped_step_does_not_step_the_policy():
    """A noisy regression makes the policy grow B as soon as its hold of 3 steps is over (after step 2 in a run
    without NaN). Step 2 (NaN features) is skipped: B, the learning rate and the hold counter stay as they were
    after step 1, and B grows after step 3, the third finite step (before, the skipped step counted)."""
    dataset = regression_data(noise=1.0)
    inputs, targets = dataset.tensors
    inputs = inputs.clone()
    policy = NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=64, hold_steps=3, max_factor=2.0)
    trainer = make_trainer(linear_model(), TensorDataset(inputs, targets), loss_fn=per_example_squared_error,
                           lr=0.02, policy=policy, lr_coupling="linear", seed=3)
    batches = list(type(trainer.sampler)(len(dataset), 4, seed=3))
    inputs[batches[2][1]] = math.nan
    rows = [trainer.step() for _ in range(2)]
    state_before, factor_before = copy.copy(policy.state), trainer.lr_factor
    rows.append(trainer.step())
    assert rows[2]["skipped"] and policy.state == state_before and state_before.steps_since_change == 2
    assert trainer.lr_factor == factor_before == 1.0 and trainer.optimizer.param_groups[0]["lr"] == 0.02
    rows.append(trainer.step())
    assert not rows[3]["skipped"] and [row["batch_size"] for row in rows] == [4, 4, 4, 4]
    grown = policy.target_batch_size(4, rows[3]["b_simple"])
    assert grown > 4 and policy.state == NoiseScalePolicyState(grown, 0)
    assert trainer.lr_factor == pytest.approx(grown / 4, rel=1e-12)
    assert trainer.step()["learning_rate"] == pytest.approx(0.02 * grown / 4, rel=1e-12)


@pytest.mark.filterwarnings("ignore:.*non-finite loss or gradient:RuntimeWarning")
def test_a_grad_scaler_overflow_is_skipped_and_the_scale_backs_off():
    """fp16-style loss scaling with a scale so large that the scaled gradients overflow float32: no step is taken
    and the scale halves (GradScaler's backoff) until the gradients fit."""
    model = small_net(dtype=torch.float32)
    trainer = make_trainer(model, classification_data(dtype=torch.float32), batch_size=16, seed=1)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    before = parameters_of(model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        row = trainer.step()
    assert row["skipped"] and trainer.grad_scaler.get_scale() == 2.0**126
    assert all(torch.equal(expected, actual) for expected, actual in zip(before, model.parameters()))


@pytest.mark.parametrize("learning_rate, diverges", [(50.0, True), (0.1, False)])
def test_a_diverged_run_suggests_no_batch_size(learning_rate, diverges):
    """`measure --lr 50` in small: the loss explodes; the parameters stay finite, and the summary says the run
    diverged instead of printing B_simple with an interval and a suggested batch size. At lr 0.1 it does print them."""
    model = small_net(dtype=torch.float32)
    trainer = make_trainer(model, classification_data(n=256, dtype=torch.float32), lr=learning_rate,
                           momentum=0.9, batch_size=32, seed=0)
    for _ in range(40):
        trainer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    summary = trainer.monitor.summary()
    text = str(summary)
    if diverges:
        assert summary.divergence is not None and "diverged" in text and "no batch size is suggested" in text
        assert "B_simple =" not in text and "interval" not in text and "suggested: about" not in text
        assert math.isnan(summary.suggested_batch_size)
    else:
        assert summary.divergence is None and "diverged" not in text
        assert "B_simple =" in text and "critical batch size suggested: about" in text


def test_checkpoint_with_ddp_module_prefix_of_earlier_versions_still_loads():
    """Earlier versions saved a DDP model's state with DDP's "module." prefix; such a checkpoint still resumes."""
    _, trainer = noise_adaptive_trainer()
    trainer.train(epochs=1)
    state = trainer.state_dict()
    state["model"] = OrderedDict((f"module.{name}", value) for name, value in state["model"].items())
    resumed_model, resumed = noise_adaptive_trainer(seed_of_model=1)
    resumed.load_state_dict(state)
    assert all(name.startswith("module.") for name in state["model"])  # the caller's dict is left as it was
    for expected, actual in zip(trainer.model.parameters(), resumed_model.parameters()):
        assert torch.equal(expected, actual)


class FailsOnce(torch.nn.Module):
    """Wraps a model; the first forward of a batch larger than ``limit`` raises a CUDA-style OOM error."""

    def __init__(self, inner: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.failures = inner, limit, 0

    def forward(self, inputs):
        if inputs.shape[0] > self.limit and self.failures == 0:
            self.failures += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.inner(inputs)


def test_out_of_memory_halves_the_micro_batch_and_repeats_the_step():
    schedule = BatchSizeSchedule("batch-increase", base_learning_rate=0.1, base_batch_size=8, milestones=[1.0],
                                 decay_factor=0.5, max_batch_size=16)
    faulty = FailsOnce(small_net(dropout=0.3), limit=4)
    trainer = make_trainer(faulty, classification_data(), momentum=0.9, schedule=schedule, max_micro_batch=8)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        trainer.train(epochs=2)
    assert faulty.failures == 1 and trainer.max_micro_batch == 4

    clean = FailsOnce(small_net(dropout=0.3), limit=10**9)  # starts where the faulty run ended up
    reference = make_trainer(clean, classification_data(), momentum=0.9, schedule=BatchSizeSchedule(
        **schedule.state_dict()), max_micro_batch=4)
    reference.train(epochs=2)
    for expected, actual in zip(clean.parameters(), faulty.parameters()):
        assert torch.equal(expected, actual)
    assert trainer.steps == reference.steps and trainer.sampler.examples_seen == reference.sampler.examples_seen
    assert trainer.monitor.step == trainer.steps  # the failed attempt left no history row


def test_out_of_memory_is_recognised_and_other_errors_pass_through():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    trainer = make_trainer(FailsOnce(small_net(), limit=0), classification_data(), batch_size=1)
    with pytest.raises(RuntimeError, match="out of memory"):  # a micro-batch of 1 cannot be halved
        trainer.step()


# --------------------------------------------------------------------------- batch sizes and data order


class IndexLogging(Dataset):
    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset, self.seen = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.seen.append(index)
        return self.dataset[index]


def regression_data(noise: float, n: int = 256, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    return TensorDataset(inputs, targets + noise * torch.randn(n, generator=generator, dtype=torch.float64))


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1).double()


def _warmup_then_halves(step: int) -> float:
    """A LambdaLR multiplier, recomputed from the base rate at each scheduler.step() (as OneCycleLR and
    transformers' get_cosine_schedule_with_warmup are): 4 steps of warmup, then halved every 6 steps."""
    return (step + 1) / 4 if step < 4 else 0.5 ** ((step - 4) // 6)


@pytest.mark.parametrize("source", ["policy", "schedule"])
def test_a_learning_rate_scheduler_and_the_trainers_factor_multiply(source):
    """A LambdaLR stepped after every trainer step, built before the trainer as scripts do. The coupling wrote the
    coupled rate into the groups, and the scheduler's next step recomputed it from its base rates: the coupling was
    lost (lr 0.1 at every B); a Smith schedule set the rates from those the trainer was built with at every step,
    and the scheduler was lost (its first warmup rate for good). The rate each optimizer step used (read by a step
    pre-hook) is now the scheduler's times the policy's B / B_0 or the schedule's eps / eps_0, computed here from
    the multiplier and the history's B or epoch."""
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_halves)
    used = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    if source == "policy":
        options = {"policy": NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=64, hold_steps=1,
                                                   max_factor=2.0), "lr_coupling": "linear"}
    else:
        options = {"schedule": BatchSizeSchedule("lr-decay", base_learning_rate=0.5, base_batch_size=8,
                                                 milestones=[0.25, 0.5], decay_factor=0.2)}
    trainer = AdaptiveTrainer(model, per_example_squared_error, optimizer, regression_data(3.0), seed=2,
                              progress=False, **options)
    for _ in range(24):
        trainer.step()
        scheduler.step()
    history = trainer.history
    if source == "policy":
        assert history["batch_size"].nunique() > 2
        factors = history["batch_size"] / 4
    else:
        epochs = (history["examples_seen"] - history["batch_size"]) / 256   # the epoch each step began at
        factors = [1.0 if e < 0.25 else 0.2 if e < 0.5 else 0.04 for e in epochs]
        assert len(set(factors)) == 3
    expected = [0.05 * _warmup_then_halves(step) * factor for step, factor in zip(range(24), factors)]
    assert used == pytest.approx(expected, rel=1e-14) and history["learning_rate"].tolist() == used
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * _warmup_then_halves(24), rel=1e-15)


class _Pairs(Dataset):
    """Items as a user may hold them: dicts, variable-length sequences, or proper (inputs, targets) pairs."""

    def __init__(self, kind: str):
        self.kind = kind

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        if self.kind == "dict":
            return {"x": torch.ones(4, dtype=torch.float64), "labels": torch.tensor(1.0, dtype=torch.float64)}
        return torch.ones(4 + index % 3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.ones(4, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))] * 16)


@pytest.mark.parametrize("given, error, match", [
    ("loader", TypeError, r"dataset is a DataLoader.*pass loader.dataset"),
    ("stream", TypeError, r"dataset must be map-style.*got a _Stream"),
    ("dict", TypeError, r"an \(inputs, targets\) pair, and item 0 is a dict with keys \['labels', 'x'\]"),
    ("ragged", ValueError, r"tensors differ in shape.*pad them to one shape in the dataset"),
    ("coupling", ValueError, r"lr_coupling='linear' couples.*a constant batch_size: leave lr_coupling='none'"),
])
def test_data_and_options_the_trainer_cannot_take_are_refused_naming_what_to_do(given, error, match):
    """A survey's finds: a DataLoader was taken (its len as N) and failed at the first step with "'DataLoader' object
    is not subscriptable"; an IterableDataset with "has no len()"; dict items with "inputs must be a tensor... got
    str"; sequences of different lengths with torch's "stack expects each tensor to be equal size"; lr_coupling with
    a constant batch size was ignored without a word. Each is now refused naming the cause and the remedy, before
    any step for all but the items (read at the first step, with the parameters untouched)."""
    model = linear_model()
    before = parameters_of(model)
    dataset = {"loader": torch.utils.data.DataLoader(regression_data(3.0), batch_size=4), "stream": _Stream(),
               "dict": _Pairs("dict"), "ragged": _Pairs("ragged"), "coupling": regression_data(3.0)}[given]
    with pytest.raises(error, match=match):
        trainer = make_trainer(model, dataset, loss_fn=per_example_squared_error, batch_size=4,
                               lr_coupling="linear" if given == "coupling" else "none")
        trainer.step()
    assert all(map(torch.equal, before, model.parameters())) and all(p.grad is None for p in model.parameters())


def test_a_schedules_momentum_rule_reads_the_optimizers_momentum():
    """Smith et al.'s momentum rule scales B by (1 - m_0)/(1 - m) at the momentum m in use: the trainer never gave
    the schedule its optimizer's momentum, so with m_0 = 0 and SGD at 0.9 B stayed at B_0 = 8 where 80 was meant
    (a survey's find). Now B = 8 / (1 - 0.9) rounded, and eps = g B (1 - m) leaves the rate at 0.1; an optimizer
    without a momentum setting is refused."""
    schedule = BatchSizeSchedule("batch-increase", base_learning_rate=0.1, base_batch_size=8, momentum_rule=True)
    trainer = make_trainer(linear_model(), regression_data(3.0), loss_fn=per_example_squared_error, lr=0.1,
                           momentum=0.9, schedule=schedule)
    row = trainer.step()
    assert row["batch_size"] == round(8 / (1 - 0.9)) == 80
    assert row["learning_rate"] == pytest.approx(0.1 * 80 * (1 - 0.9) / 8, rel=1e-12)
    model = linear_model()
    with pytest.raises(ValueError, match="momentum rule.*Adam has no 'momentum' setting"):
        AdaptiveTrainer(model, per_example_squared_error, torch.optim.Adam(model.parameters()), regression_data(3.0),
                        schedule=schedule, progress=False)


def test_a_momentum_the_rule_turns_into_a_batch_larger_than_the_dataset_is_refused_naming_max_batch_size():
    """A scheduler that raises the momentum after the trainer was built (OneCycleLR cycles it up to 0.95): B_0 / (1 -
    m) outgrows the dataset, and the sampler's bare 'batch_size=160 exceeds the dataset size' came at the step (a
    review's find). The step now names the momentum rule and the schedule's max_batch_size, and takes nothing."""
    schedule = BatchSizeSchedule("fixed", base_learning_rate=0.1, base_batch_size=8, momentum_rule=True)
    model = linear_model()
    trainer = make_trainer(model, regression_data(3.0, n=128), loss_fn=per_example_squared_error, lr=0.1,
                           momentum=0.9, schedule=schedule)
    trainer.optimizer.param_groups[0]["momentum"] = 0.95
    before = parameters_of(model)
    with pytest.raises(ValueError, match=r"momentum rule asks for B = 160 at momentum 0.95, more than the dataset's "
                                         r"128 examples: give the schedule a max_batch_size of at most 128"):
        trainer.step()
    assert all(map(torch.equal, before, model.parameters())) and trainer.steps == 0


def test_a_checkpoint_whose_averages_had_no_finite_population_correction_resumes_with_a_warning():
    """Averages taken before session 25 (no population_size in the monitor's state) or with another N mix two
    estimates of |G|^2 after a resume: said, not refused (a review's find: silently mixed before)."""
    trainer = make_trainer(small_net(), classification_data(), batch_size=8)
    trainer.step()
    state = copy.deepcopy(trainer.state_dict())
    del state["monitor"]["population_size"]
    with pytest.warns(RuntimeWarning, match=r"taken without the finite-population correction.*population_size is 96"):
        make_trainer(small_net(), classification_data(), batch_size=8).load_state_dict(state)
    state["monitor"]["population_size"] = 96
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(small_net(), classification_data(), batch_size=8).load_state_dict(state)


def test_a_tensor_learning_rate_under_a_scheduler_resumes_without_a_warning():
    """base_learning_rates held the optimizer's lr tensor itself, which a scheduler changes in place: an exact
    resume warned that the checkpoint's lr 0.005 differed from this trainer's 0.01 (a review's find)."""
    def trainer_of():
        model = linear_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float64))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        return scheduler, AdaptiveTrainer(model, per_example_squared_error, optimizer, regression_data(3.0),
                                          batch_size=8, progress=False)

    scheduler, trainer = trainer_of()
    for _ in range(2):
        trainer.step()
        scheduler.step()
    state = copy.deepcopy(trainer.state_dict())
    assert state["base_learning_rates"] == [0.01]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_of()[1].load_state_dict(state)


@pytest.mark.parametrize("source", ["policy", "schedule"])
def test_a_checkpoint_of_a_version_that_coupled_the_groups_rates_resumes_identically(source):
    """Before session 25 the groups' rates held the coupled (policy) or scheduled rate and a checkpoint had no
    lr_factor: such a checkpoint continues as the uninterrupted run."""
    def trainer_of():
        if source == "policy":
            return noise_adaptive_trainer(dropout=0.0)
        model = small_net()
        schedule = BatchSizeSchedule("lr-decay", base_learning_rate=0.2, base_batch_size=8, milestones=[0.5],
                                     decay_factor=0.2)
        return model, make_trainer(model, classification_data(), lr=0.2, momentum=0.9, schedule=schedule, seed=5)

    model, trainer = trainer_of()
    trainer.train(epochs=1)
    old = copy.deepcopy(trainer.state_dict())
    factor = old.pop("lr_factor")
    assert factor != 1.0
    for group in old["optimizer"]["param_groups"]:
        group["lr"] *= factor   # what the earlier versions held there
    trainer.train(epochs=2)
    resumed_model, resumed = trainer_of()
    resumed.load_state_dict(old)
    resumed.train(epochs=2)
    np.testing.assert_allclose(resumed.history["learning_rate"], trainer.history["learning_rate"], rtol=1e-14)
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_noise_adaptive_batch_stays_within_b_max_and_every_example_is_seen_once_per_epoch():
    dataset = IndexLogging(regression_data(noise=3.0))
    policy = NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=48, hold_steps=1, max_factor=2.0)
    trainer = make_trainer(linear_model(), dataset, loss_fn=per_example_squared_error, lr=0.05, policy=policy,
                           max_micro_batch=16)
    trainer.train(epochs=4)
    sizes = trainer.history["batch_size"]
    assert sizes.max() == 48 and (sizes <= 48).all()  # reaches B_max, never exceeds it
    assert (sizes.diff().dropna() >= 0).all()
    assert sum(sizes) == len(dataset.seen) == trainer.sampler.examples_seen
    for epoch in range(4):
        assert sorted(dataset.seen[epoch * 256:(epoch + 1) * 256]) == list(range(256))


def test_noise_adaptive_follows_the_measured_noise_scale():
    """Noisy targets keep tr(Sigma) large while |G|^2 shrinks: B_simple grows and B follows it; every change
    is the policy's target for the smoothed B_simple of that step, and the linear coupling keeps eps / B."""
    finals = {}
    for noise in (0.05, 3.0):
        policy = NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=128, hold_steps=3, max_factor=2.0)
        trainer = make_trainer(linear_model(), regression_data(noise), loss_fn=per_example_squared_error, lr=0.02,
                               policy=policy, lr_coupling="linear")
        history = trainer.train(epochs=3)
        changes = history.index[history["batch_size"].diff() > 0]
        for index in changes:
            before = history.loc[index - 1]
            assert history.loc[index, "batch_size"] == policy.target_batch_size(int(before["batch_size"]),
                                                                                before["b_simple"])
        ratio = history["learning_rate"] / history["batch_size"]
        assert ratio.to_numpy() == pytest.approx(0.02 / 4, rel=1e-12)
        finals[noise] = history["batch_size"].iloc[-1]
    assert finals[3.0] >= 2 * finals[0.05] and finals[3.0] > 4


def test_noise_adaptive_can_follow_b_noise():
    """policy_noise_scale='b_noise': every change of B is the policy's target for the moving-average B_noise as of
    the step before (the history records it on the Hessian steps; it holds in between)."""
    policy = NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=128, hold_steps=3, max_factor=2.0)
    trainer = make_trainer(linear_model(), regression_data(3.0), loss_fn=per_example_squared_error, lr=0.02,
                           policy=policy, policy_noise_scale="b_noise",
                           monitor_options={"hessian_every": 2, "hessian_examples": 4, "hessian_probes": 2})
    history = trainer.train(epochs=3)
    b_noise = history["b_noise"].ffill()
    changes = history.index[history["batch_size"].diff() > 0]
    assert len(changes) >= 2
    for index in changes:
        assert history.loc[index, "batch_size"] == policy.target_batch_size(
            int(history.loc[index - 1, "batch_size"]), b_noise.loc[index - 1])
    with pytest.raises(ValueError, match="b_noise' needs the Hessian proxies"):
        make_trainer(linear_model(), regression_data(3.0), policy=NoiseScaleBatchPolicy(4, min_batch_size=4,
                     max_batch_size=8), policy_noise_scale="b_noise")


def adascale_reference(trace_sigma: float, grad_sqnorm: float, batch_size: int, base_batch_size: int) -> float:
    """AdaScale's gain (Johnson et al. 2020, eq. 3; fairscale's AdaScale.gain) of S = B / B_0, written out here
    apart from noisescale: sigma^2 = tr(Sigma) / B_0 (a B_0 batch's gradient variance), mu^2 = |G|^2, negative
    estimates clipped to 0 as fairscale does (|G|^2 <= 0: r = S)."""
    variance, mean = max(float(trace_sigma), 0.0) / base_batch_size, max(float(grad_sqnorm), 0.0)
    scale = batch_size / base_batch_size
    return scale if mean == 0.0 else (variance + mean) / (variance / scale + mean)


@pytest.mark.parametrize("measure_every", [1, 3])
def test_adascale_factor_is_the_gain_of_b_over_b0_from_the_steps_own_averages(measure_every):
    """lr_coupling='adascale' (the hunt's repro in float64, B_max 96): every step's learning rate is eps_0 times
    AdaScale's gain of S = B / B_0 computed from that row's logged moving averages (trace_sigma_ema,
    grad_sqnorm_ema; carried over unmeasured steps), the rate the optimizer steps with. Once B sits at B_max the
    factor keeps following B_simple (before, it was a product of ratios taken when B changed, frozen at B_max:
    in the hunt's float32 repro 5.56 at step 39 where the gain was 13.86)."""
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(400, 10, generator=generator, dtype=torch.float64),
                            torch.randint(0, 3, (400,), generator=generator))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).double()
    policy = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=96, hold_steps=2)
    trainer = make_trainer(model, dataset, lr=0.05, policy=policy, lr_coupling="adascale",
                           monitor_options={"measure_every": measure_every})
    stepped = []
    optimizer_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *args, **kwargs: (stepped.append(trainer.optimizer.param_groups[0]["lr"]),
                                                      optimizer_step(*args, **kwargs))[1]
    history = pd.DataFrame([trainer.step() for _ in range(40)])
    assert not history["skipped"].any() and history["measured"].sum() == len(range(0, 40, measure_every))
    averages = history[["trace_sigma_ema", "grad_sqnorm_ema"]].ffill()
    expected = [0.05 * adascale_reference(trace_sigma, grad_sqnorm, batch_size, 8) for trace_sigma, grad_sqnorm,
                batch_size in zip(averages["trace_sigma_ema"], averages["grad_sqnorm_ema"], history["batch_size"])]
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(stepped, history["learning_rate"], rtol=1e-15, atol=0)   # the rate logged is used
    assert trainer.optimizer.param_groups[0]["lr"] == 0.05   # the factor is applied for the step only
    assert history["batch_size"].nunique() >= 4 and history["learning_rate"].max() > 3 * 0.05
    if measure_every == 1:   # B fixed at B_max from step 22 on while B_simple grows 115 -> 215: the factor follows
        at_max = history[history["batch_size"] == 96]
        assert len(at_max) >= 15 and at_max["b_simple"].iloc[-1] > 1.5 * at_max["b_simple"].iloc[0]
        assert at_max["learning_rate"].nunique() == len(at_max)
        assert at_max["learning_rate"].iloc[-1] / at_max["learning_rate"].iloc[0] > 1.2


class FrozenAverage:
    """Stands in for the monitor's moving average with given values that no step's measurement moves."""

    def __init__(self, average, trace_sigma: float, grad_sqnorm: float) -> None:
        self.inner = average
        self.set(trace_sigma, grad_sqnorm)

    def set(self, trace_sigma: float, grad_sqnorm: float) -> None:
        state = {**self.inner.state_dict(), "num_updates": 1, "weight_sum": 1.0, "weight_sqsum": 1.0,
                 "num_sum": trace_sigma, "den_sum": grad_sqnorm}
        self.inner.load_state_dict(state)

    def update_estimate(self, estimate) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_adascale_factor_does_not_depend_on_the_path_b_took():
    """With the averages held at given values (float64): run 1 goes 8 -> 16 at B_simple 80, then 16 -> 32 at
    B_simple 400; run 2 goes 8 -> 32 at B_simple 400. At B = 32 both use AdaScale's gain of S = 4 at B_simple
    400, 3.7778 (before: run 1 used the composed 3.5309). At |G|^2 <= 0 the factor is the upper bound S; where both
    averages are 0 (every per-example gradient 0) the factor in use is kept."""
    def run(max_factor, estimates):
        policy = NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32, hold_steps=1, max_factor=max_factor)
        trainer = make_trainer(small_net(), classification_data(), lr=0.1, policy=policy, lr_coupling="adascale")
        trainer.monitor.average = FrozenAverage(trainer.monitor.average, *estimates[0])
        rows = []
        for trace_sigma, grad_sqnorm in estimates:
            trainer.monitor.average.set(trace_sigma, grad_sqnorm)
            rows.append(trainer.step())
        return [row["batch_size"] for row in rows], [row["learning_rate"] / 0.1 for row in rows], trainer

    sizes, factors, _ = run(2.0, [(80.0, 1.0), (400.0, 1.0), (400.0, 1.0)])
    assert sizes == [8, 16, 32]
    assert factors == pytest.approx([1.0, adascale_reference(400.0, 1.0, 16, 8),
                                     adascale_reference(400.0, 1.0, 32, 8)], rel=1e-13)
    direct_sizes, direct_factors, _ = run(4.0, [(400.0, 1.0), (400.0, 1.0)])
    assert direct_sizes == [8, 32]
    assert factors[-1] == pytest.approx(direct_factors[-1], rel=1e-13)
    assert direct_factors[-1] == pytest.approx(34 / 9, rel=1e-13)   # (50 + 1) / (12.5 + 1)
    # unresolved |G|^2 (the averaged estimate <= 0): the upper bound S; B_simple is infinite, the policy holds B
    sizes, factors, trainer = run(2.0, [(80.0, 1.0), (80.0, -0.5), (80.0, 0.0)])
    assert sizes == [8, 16, 16] and factors[1:] == [2.0, 2.0]
    assert trainer.lr_factor == 2.0
    # both averages exactly 0 (every per-example gradient 0): the gain is 0/0, not the bound S; the factor is kept
    sizes, factors, trainer = run(2.0, [(80.0, 1.0), (80.0, 1.0), (0.0, 0.0)])
    assert sizes == [8, 16, 32] and factors[2] == factors[1] == pytest.approx(adascale_reference(80.0, 1.0, 16, 8))


def test_max_micro_batch_does_not_change_the_hessian_proxies():
    """A batch of 16 in micro-batches of 4 (two make the gradient half, two the Hessian half) gives the Hessian
    proxies of the unsplit batch, to float64 rounding, step after step (before, the first micro-batch's alone: a
    new user's policy on B_noise stayed at B = 32 with max_micro_batch and grew to 512 without). Three unequal
    micro-batches (6, 5, 5) split the batch at 6 and give another estimate of the same quantities."""
    options = {"hessian_every": 1, "hessian_examples": 4, "hessian_probes": 3, "seed": 7}
    columns = ["trace_h", "trace_h_stderr", "g_h_g", "trace_h_sigma", "fisher_trace", "b_noise"]
    histories = {}
    for micro in (None, 4, 6):
        trainer = make_trainer(linear_model(), regression_data(3.0), loss_fn=per_example_squared_error,
                               batch_size=16, max_micro_batch=micro, seed=2, monitor_options=options)
        histories[micro] = trainer.train(epochs=0.25)
    assert histories[4]["micro_batches"].eq(4).all() and len(histories[4]) == 4
    pd.testing.assert_frame_equal(histories[4][columns], histories[None][columns], check_exact=False, rtol=1e-10)
    inputs, targets = regression_data(3.0)[next(iter(ResizableBatchSampler(256, 16, seed=2)))]
    split = micro_batch_hessian_noise_scale(linear_model(), per_example_squared_error,
                                            list(zip(inputs.split([6, 5, 5]), targets.split([6, 5, 5]))),
                                            num_probes=3, num_sigma_examples=4,
                                            generator=torch.Generator().manual_seed(7), population=256)
    first = histories[6].iloc[0]
    assert split.gradient_batch_size == 6 and first["trace_h"] == pytest.approx(histories[None]["trace_h"][0])
    assert first["g_h_g"] == pytest.approx(split.g_h_g, rel=1e-12) and first["g_h_g"] != histories[None]["g_h_g"][0]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [  # (B, eps) in the epochs [0, 1), [1, 2), [2, 3) with B_0 = 4, eps_0 = 0.1, f = 1/4, B_max = 32
        ("fixed", [(4, 0.1), (4, 0.1), (4, 0.1)]),
        ("lr-decay", [(4, 0.1), (4, 0.025), (4, 0.00625)]),
        ("batch-increase", [(4, 0.1), (16, 0.1), (32, 0.05)]),
        ("hybrid", [(4, 0.1), (8, 0.05), (16, 0.025)]),
    ],
)
def test_each_schedule_sets_batch_size_and_learning_rate_by_epoch(mode, expected):
    schedule = BatchSizeSchedule(mode, base_learning_rate=0.1, base_batch_size=4,
                                 milestones=[] if mode == "fixed" else [1.0, 2.0], decay_factor=0.25,
                                 max_batch_size=32)
    dataset = classification_data(n=64)
    trainer = make_trainer(small_net(), dataset, lr=0.1, schedule=schedule, max_micro_batch=8)
    history = trainer.train(epochs=3)
    epoch_before_step = (history["examples_seen"] - history["batch_size"]) / len(dataset)
    for stage, (batch_size, learning_rate) in enumerate(expected):
        rows = history[epoch_before_step.floordiv(1) == stage]
        assert len(rows) > 0
        assert (rows["batch_size"] == batch_size).all()
        assert rows["learning_rate"].to_numpy() == pytest.approx(learning_rate, rel=1e-12)


def test_bad_arguments_are_rejected_with_the_cause():
    dataset = classification_data(n=32)
    with pytest.raises(ValueError, match="exactly one of batch_size, schedule, policy"):
        make_trainer(small_net(), dataset)
    with pytest.raises(ValueError, match="dataset has only 32"):
        make_trainer(small_net(), dataset, policy=NoiseScaleBatchPolicy(4, min_batch_size=4, max_batch_size=64))
    with pytest.raises(ValueError, match="lr_coupling"):
        make_trainer(small_net(), dataset, batch_size=4, lr_coupling="cubic")
    with pytest.raises(ValueError, match="fp16"):
        make_trainer(small_net(), dataset, batch_size=4, amp="fp16", device="cpu")
    with pytest.raises(ValueError, match="epochs"):
        make_trainer(small_net(), dataset, batch_size=4).train(epochs=math.nan)


# --------------------------------------------------------------------------- the command line


def test_train_command_runs_checkpoints_and_resumes(tmp_path, capsys):
    common = ["train", "--schedule", "batch-increase", "--model", "noisescale.models:mlp", "--train-examples", "256", "--batch-size", "16", "--max-batch-size", "128", "--milestones", "1",
              "--max-micro-batch", "32", "--no-progress", "--device", "cpu"]
    assert main([*common, "--epochs", "1", "--checkpoint", str(tmp_path / "run.pt"), "--out", str(tmp_path)]) == 0
    assert main([*common, "--epochs", "2", "--resume", str(tmp_path / "run.pt"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "batch-increase: test accuracy" in printed and "optimizer steps" in printed
    history = pd.read_csv(tmp_path / "train_batch-increase_history.csv")
    # 16 steps of 16 examples in epoch 0, then B = 80 (16 / 0.2) from epoch 1 on
    assert list(history["batch_size"].iloc[:16]) == [16] * 16 and set(history["batch_size"].iloc[16:]) == {80}
    evaluations = pd.read_csv(tmp_path / "train_batch-increase_evaluations.csv")
    assert len(evaluations) == 2 and evaluations["test_accuracy"].between(0, 1).all()
    assert (tmp_path / "train_batch-increase.png").stat().st_size > 10_000
    # --epochs not above the checkpoint's: nothing to train, said (it exited 0 without a word: a survey's find)
    assert main([*common, "--epochs", "1", "--resume", str(tmp_path / "run.pt"), "--out", str(tmp_path / "again")]) == 0
    assert "the checkpoint has trained 1 epochs already, --epochs 1: nothing more is trained" in capsys.readouterr().err
    # another run's checkpoint (another --seed): an error naming --resume and what to check, the files untouched
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    assert main([*common, "--epochs", "2", "--seed", "7", "--resume", str(tmp_path / "run.pt"),
                 "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "--resume '" in error and "the checkpoint is not of this run" in error and "--seed" in error
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == files
    # another --hessian-every (a new user's trial, with --lr-coupling: accepted without a word, and the run went on
    # differently)
    assert main([*common, "--epochs", "2", "--hessian-every", "2", "--resume", str(tmp_path / "run.pt"),
                 "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "hessian_every=0 there, 2 here" in error and "--hessian-every" in error
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == files


def test_a_checkpoint_of_other_trainer_settings_is_refused_before_anything_loads():
    """lr_coupling, policy_noise_scale, measure_every and hessian_every were not in the checkpoint, so a resume
    with others continued another run than the checkpointed one without a word. Refused now, naming each, with
    the trainer left as it was."""
    saved = make_trainer(small_net(), classification_data(), policy=NoiseScaleBatchPolicy(8, min_batch_size=8,
                                                                                         max_batch_size=32))
    saved.step()
    model = small_net(seed=1)
    other = make_trainer(model, classification_data(), policy=NoiseScaleBatchPolicy(8, min_batch_size=8,
                                                                                    max_batch_size=32),
                         lr_coupling="linear", monitor_options={"hessian_every": 2})
    before = parameters_of(model)
    with pytest.raises(ValueError, match=r"other settings: lr_coupling='none' there, 'linear' here; hessian_every=0 "
                                         r"there, 2 here"):
        other.load_state_dict(saved.state_dict())
    assert all(map(torch.equal, before, model.parameters())) and other.steps == 0


def test_a_step_that_raises_takes_no_batch_and_the_run_continues_as_if_it_had_not():
    """An error inside a step (Ctrl-C in a notebook, a loader or loss error) used to lose its batch from the epoch
    (a new user's run trained 16 examples fewer, parameters 1.1e-2 apart). Now the sampler and the random stream
    are put back and p.grad is cleared; a second call draws the same batch: the run equals an uninterrupted one,
    dropout included."""
    calls = {"count": 0, "raise_at": None}

    def interrupted_loss(outputs, targets):
        calls["count"] += 1
        if calls["count"] == calls["raise_at"]:
            raise KeyboardInterrupt
        return per_example_cross_entropy(outputs, targets)

    data = classification_data()
    finished = []
    for raise_at in (None, 6):
        model = small_net(dropout=0.2)
        trainer = make_trainer(model, data, loss_fn=interrupted_loss, batch_size=16, momentum=0.9)
        calls.update(count=0, raise_at=raise_at)
        if raise_at is not None:
            with pytest.raises(KeyboardInterrupt):
                trainer.train(1.0)
            assert trainer.sampler.examples_seen == 16 * trainer.steps == int(trainer.history["batch_size"].sum())
            assert all(p.grad is None for p in model.parameters())
        trainer.train(1.0)
        finished.append((parameters_of(model), trainer.history.drop(columns="seconds")))
    (plain, plain_history), (resumed, resumed_history) = finished
    assert all(torch.equal(a, b) for a, b in zip(plain, resumed))
    pd.testing.assert_frame_equal(plain_history, resumed_history)


def test_a_ctrl_c_during_the_optimizer_step_comes_after_the_step_and_its_row():
    """A Ctrl-C inside ``optimizer.step()`` left the batch taken and the averages updated with the parameters
    unmoved and no history row (session 21's audit: 208 examples seen against 192 twelve steps later). It is now
    held until the step and its row are complete: the interrupted run, continued, equals an uninterrupted one."""
    import signal

    class InterruptedSGD(torch.optim.SGD):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.interrupt_at:
                signal.raise_signal(signal.SIGINT)   # Ctrl-C arrives before any parameter moves
            return super().step(closure)

    finished = []
    for interrupt_at in (None, 3):
        model = small_net()
        optimizer = InterruptedSGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer.interrupt_at = interrupt_at
        trainer = AdaptiveTrainer(model, per_example_cross_entropy, optimizer, classification_data(),
                                  policy=NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32), progress=False)
        if interrupt_at is not None:
            with pytest.raises(KeyboardInterrupt):
                trainer.train(1.0)
            assert trainer.steps == len(trainer.history) == interrupt_at
            assert trainer.sampler.examples_seen == int(trainer.history["batch_size"].sum())
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        trainer.train(1.0)
        finished.append((parameters_of(model), trainer.history.drop(columns="seconds")))
    (plain, plain_history), (resumed, resumed_history) = finished
    assert all(torch.equal(a, b) for a, b in zip(plain, resumed))
    pd.testing.assert_frame_equal(plain_history, resumed_history)


@pytest.mark.parametrize("source", ["policy", "schedule"])
def test_a_step_interrupted_in_its_hessian_proxies_counts_its_batch_once(source):
    """Ctrl-C during the Hessian proxies (a step's slow part) came after the step's estimates had entered the moving
    averages; step() put back the sampler, the random stream and p.grad but not them, so the retried step counted the
    batch twice (a new user's run: 5 updates in 4 steps, tr(Sigma) EMA 3.139 against 3.254). Now the monitor's state
    and the learning rates a schedule set are put back too: the state after the failed step is the state before it,
    and the run equals an uninterrupted one (two micro-batches: the two-batch average included)."""
    finished = []
    for interrupt in (False, True):
        model = small_net()
        source_option = ({"policy": NoiseScaleBatchPolicy(8, min_batch_size=8, max_batch_size=32)} if source == "policy"
                         else {"schedule": BatchSizeSchedule("lr-decay", base_learning_rate=0.1, base_batch_size=8,
                                                             milestones=[0.05])})   # decays at step 1
        trainer = make_trainer(model, classification_data(), max_micro_batch=4, **source_option,
                               monitor_options={"hessian_every": 1, "hessian_examples": 4, "hessian_probes": 2})
        trainer.step()
        if interrupt:
            def interrupted(micro_batches):
                raise KeyboardInterrupt

            def state():
                monitor = trainer.monitor.state_dict()
                return copy.deepcopy({**trainer.state_dict(), "monitor": None, "seconds": None}), monitor

            before = state()
            trainer.monitor._hessian_proxies = interrupted
            with pytest.raises(KeyboardInterrupt):
                trainer.step()
            del trainer.monitor._hessian_proxies
            (trainer_before, monitor_before), (trainer_after, monitor_after) = before, state()
            assert monitor_after == monitor_before
            assert trainer_after["optimizer"]["param_groups"] == trainer_before["optimizer"]["param_groups"]
            assert trainer_after["policy"] == trainer_before["policy"] and trainer_after["steps"] == 1
        for _ in range(3):
            trainer.step()
        finished.append((parameters_of(model), trainer.history.drop(columns="seconds"),
                         {**trainer.monitor.state_dict(), "history": None}))
    (plain, plain_history, plain_monitor), (retried, retried_history, retried_monitor) = finished
    assert all(torch.equal(a, b) for a, b in zip(plain, retried))
    pd.testing.assert_frame_equal(plain_history, retried_history)
    assert retried_monitor == plain_monitor and retried_monitor["average"]["num_updates"] == 4


class TinyTokenModel(torch.nn.Module):
    """Tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, vocab=11):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens)))


@pytest.mark.parametrize("declared", [True, False])
def test_accumulate_refuses_a_token_mean_split_into_micro_batches_and_leaves_p_grad_as_it_was(declared):
    """A reviewer's find: AccumulatingNoiseScaleMonitor.accumulate with weighting='token' normalised each
    micro-batch by its own token count, silently (p.grad 9.3e-3 from the batch's token-mean gradient)."""
    import functools

    from noisescale.losses import sequence_cross_entropy
    from noisescale.training import AccumulatingNoiseScaleMonitor

    def own_token_mean(outputs, labels):   # not declared: found by the first micro-batch's halves
        return sequence_cross_entropy(outputs, labels, shift=True, weighting="token")

    loss_fn = functools.partial(sequence_cross_entropy, shift=True, weighting="token") if declared else own_token_mean
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (8, 6), generator=generator)
    labels = tokens.masked_fill(torch.arange(6) >= torch.randint(2, 7, (8, 1), generator=generator), -100)
    torch.manual_seed(0)
    model = TinyTokenModel().double()
    monitor = AccumulatingNoiseScaleMonitor(model, loss_fn, check_independence=False)
    found = "differ when its examples are computed alone"
    with pytest.raises(ValueError, match=("weighting='token'" if declared else found)
                       + r".*accumulated from 2 micro-batches"):
        monitor.accumulate([(tokens[:4], labels[:4]), (tokens[4:], labels[4:])])
    assert all(p.grad is None for p in model.parameters()) and monitor.step == 0
    monitor.accumulate([(tokens, labels)])   # one micro-batch: the batch's own step
    assert monitor.step == 1


def test_a_loss_normalised_over_the_whole_batch_is_not_split_into_micro_batches():
    """sequence_cross_entropy's "token" weighting divides by the batch's token count: accumulated micro-batches
    were each divided by their own, and the step was not the batch's (a new user's GPT-2: parameters 2e-2 apart
    after 3 steps). Such a loss is refused when the batch would be split: declared (a partial of it) before the
    batch is drawn, inside the user's own function by a check of the first micro-batch's losses in two halves;
    unsplit it trains, and the "example" weighting accumulates to the whole batch's step (float64), check included."""
    import functools

    from noisescale.losses import normalised_over_the_batch, sequence_cross_entropy

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (40, 6), generator=generator)
    labels = tokens.masked_fill(torch.arange(6) >= torch.randint(2, 7, (40, 1), generator=generator), -100)
    data = TensorDataset(tokens, labels)
    token = functools.partial(sequence_cross_entropy, shift=True, weighting="token")
    example = functools.partial(sequence_cross_entropy, shift=True)
    assert normalised_over_the_batch(token) and not normalised_over_the_batch(example)
    assert not normalised_over_the_batch(per_example_cross_entropy)

    torch.manual_seed(0)
    model = TinyTokenModel().double()
    trainer = make_trainer(model, data, loss_fn=token, batch_size=16, max_micro_batch=5)
    before = parameters_of(model)
    with pytest.raises(ValueError, match=r"weighting='token'.*split into micro-batches of at most 5"):
        trainer.step()
    assert trainer.sampler.examples_seen == 0 and trainer.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, parameters_of(model)))
    make_trainer(model, data, loss_fn=token, batch_size=16).step()   # unsplit: trains

    def own_token_mean(outputs, labels):   # not declared: found at the first split step, before any pass
        return sequence_cross_entropy(outputs, labels, shift=True, weighting="token")

    trainer, before = make_trainer(model, data, loss_fn=own_token_mean, batch_size=16, max_micro_batch=5), \
        parameters_of(model)
    with pytest.raises(ValueError, match="differ when its examples are computed alone"):
        trainer.step()
    assert trainer.sampler.examples_seen == 0 and trainer.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, parameters_of(model)))
    assert all(p.grad is None for p in model.parameters())

    finals = []
    for max_micro_batch in (None, 5):
        torch.manual_seed(0)
        model = TinyTokenModel().double()
        trainer = make_trainer(model, data, loss_fn=example, batch_size=16, max_micro_batch=max_micro_batch)
        for _ in range(3):
            trainer.step()
        finals.append(parameters_of(model))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*finals))


def _token_batch(lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, 6) and their labels, example i's masked (-100) from position lengths[i] on."""
    tokens = torch.randint(0, 11, (len(lengths), 6), generator=generator)
    return tokens, tokens.masked_fill(torch.arange(6) >= torch.tensor(lengths)[:, None], -100)


class TokenModelWithAuxiliaryLoss(TinyTokenModel):
    """Outputs {"logits": (B, T, V), "aux": a scalar over the batch} (an MoE's load-balancing loss, HF's out.loss)."""

    def forward(self, tokens):
        logits = super().forward(tokens)
        return {"logits": logits, "aux": logits.square().mean()}


def _parts(tokens, labels, sizes):
    starts = np.cumsum([0, *sizes])
    return [(tokens[a:b], labels[a:b]) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("lengths, sizes, seen", [
    ([6, 6, 6, 6, 6, 2, 4, 3], (4, 4), "a micro-batch's losses differ"),   # the first micro-batch all full
    ([6, 6, 6, 6, 3, 3, 3, 3], (4, 4), "another example's label tokens are ignored"),   # each alike, unlike
    # the other: found within each by ignoring tokens (before session 30 by the probe across them)
    ([6, 3, 5, 2], (1, 1, 1, 1), "examples from different micro-batches"),
    ([6] * 8, (4, 4), "move when another example's label tokens are ignored"),   # every sequence full
], ids=["a later micro-batch differs", "micro-batches differ from each other", "micro-batches of one",
        "every sequence full"])
@pytest.mark.parametrize("auxiliary", [False, True], ids=["logits", "logits and a scalar"])
def test_accumulate_finds_a_token_mean_of_ones_own_beyond_the_first_micro_batch(lengths, sizes, seen, auxiliary):
    """An adversarial reviewer's find (session 28): a token mean in one's own function was looked for only in the
    first micro-batch's examples, so a first micro-batch of full sequences let the split through silently (p.grad
    0.32 off the batch's). Every micro-batch of a split step is now checked, and so are examples of different
    micro-batches put together, also beside outputs that hold no examples (a scalar: session 29's review found it
    switched the probe off, 0.50 to 0.78 off). A refused step is refused again when retried (it was let through).
    The reference: the step of the batch's token mean, unsplit, against the split step the check stops (float64)."""
    from noisescale.losses import sequence_cross_entropy
    from noisescale.training import AccumulatingNoiseScaleMonitor

    def own_token_mean(outputs, labels):
        logits = outputs["logits"] if auxiliary else outputs
        return sequence_cross_entropy(logits, labels, shift=True, weighting="token")

    tokens, labels = _token_batch(lengths, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = (TokenModelWithAuxiliaryLoss() if auxiliary else TinyTokenModel()).double()
    whole = AccumulatingNoiseScaleMonitor(copy.deepcopy(model), own_token_mean, check_independence=False)
    whole.accumulate([(tokens, labels)])
    unchecked = AccumulatingNoiseScaleMonitor(copy.deepcopy(model), own_token_mean, check_independence=False)
    unchecked._parts_checked = True   # what the split step would have done without the check
    unchecked.accumulate(_parts(tokens, labels, sizes))
    gap = max((a.grad - b.grad).abs().max().item()
              for a, b in zip(whole.model.parameters(), unchecked.model.parameters()))
    if len(set(lengths)) > 1:   # every sequence full: this step's split is the batch's, a padded batch's is not
        assert gap > 1e-3   # the split step is not the batch's: worth refusing

    monitor = AccumulatingNoiseScaleMonitor(model, own_token_mean, check_independence=False)
    for _ in range(2):
        with pytest.raises(ValueError, match=seen + rf".*accumulated from {len(sizes)} micro-batches"):
            monitor.accumulate(_parts(tokens, labels, sizes))
        assert all(p.grad is None for p in model.parameters()) and monitor.step == 0


def test_accumulate_lets_through_a_loss_of_each_example_alone_whatever_its_counts():
    """The check's other side: the same sequences under a mean over each example's own tokens (weighting="example",
    in one's own function, which draws from the global random stream as a noisy loss would) are split, and the step
    equals the unsplit batch's (float64); the random stream and p.grad are those of the split step without the
    check (the review found the check's loss calls moved the stream: p.grad 0.69 off after two steps)."""
    from noisescale.losses import sequence_cross_entropy
    from noisescale.training import AccumulatingNoiseScaleMonitor

    def own_example_mean(outputs, labels):
        return sequence_cross_entropy(outputs, labels, shift=True) + 0.0 * torch.rand(())

    tokens, labels = _token_batch([6, 6, 6, 6, 3, 3, 2, 5], torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = TinyTokenModel().double()
    whole = AccumulatingNoiseScaleMonitor(copy.deepcopy(model), own_example_mean, check_independence=False)
    whole.accumulate([(tokens, labels)])
    finals = []
    for checked in (True, False):
        split = AccumulatingNoiseScaleMonitor(copy.deepcopy(model), own_example_mean, check_independence=False)
        split._parts_checked = not checked
        torch.manual_seed(1)
        split.accumulate(_parts(tokens, labels, (4, 4)))
        assert split._parts_checked
        finals.append((torch.get_rng_state(), [p.grad for p in split.model.parameters()]))
    (checked_state, checked_grads), (unchecked_state, unchecked_grads) = finals
    assert torch.equal(checked_state, unchecked_state)
    assert all(torch.equal(a, b) for a, b in zip(checked_grads, unchecked_grads))
    for a, b in zip(whole.model.parameters(), checked_grads):
        torch.testing.assert_close(a.grad, b, rtol=1e-12, atol=1e-14)


def test_accumulate_checks_a_forward_that_hooks_its_tensors():
    """A forward that registers a hook on an activation (saliency models) cannot run without grad: the check's
    forward raised where the plain step runs (session 29's review); it now runs with grad, detached at once."""
    from noisescale.training import AccumulatingNoiseScaleMonitor

    class Hooked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(3, 8), torch.nn.Linear(8, 1)

        def forward(self, inputs):
            hidden = torch.tanh(self.first(inputs))
            hidden.register_hook(lambda grad: None)
            return self.second(hidden).squeeze(1)

    torch.manual_seed(0)
    model = Hooked().double()
    inputs, targets = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    reference = copy.deepcopy(model)
    F.mse_loss(reference(inputs), targets).backward()
    monitor = AccumulatingNoiseScaleMonitor(model, lambda out, y: (out - y) ** 2, check_independence=False)
    monitor.accumulate([(inputs[:4], targets[:4]), (inputs[4:], targets[4:])])
    assert monitor._parts_checked
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sizes", [(4, 4), (2, 2), (1, 1)])
def test_accumulate_does_not_take_paired_scores_for_a_token_mean(sizes):
    """Scores that pair each micro-batch's examples with each other (CLIP's) are no count: the check lets the split
    through, saying it could not tell (the loss of one example's rows alone cannot be computed), and p.grad is the
    micro-batches' weighted sum (float64). Two examples are not judged: their halves are
    single examples, which agree with any loss (session 29's review: a sampled-negatives loss was refused at
    micro-batches of 2 in 10 seeds of 10); the probe of 1-example micro-batches raised IndexError from the loss."""
    from noisescale.training import AccumulatingNoiseScaleMonitor

    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = torch.nn.Linear(5, 4), torch.nn.Linear(3, 4)

        def forward(self, image, text):
            return self.image(image) @ self.text(text).T

    def paired_scores_loss(scores, targets):
        labels = torch.arange(scores.shape[0])
        return (F.cross_entropy(scores, labels, reduction="none")
                + F.cross_entropy(scores.T, labels, reduction="none"))

    torch.manual_seed(0)
    model = Towers().double()
    image, text = torch.randn(sum(sizes), 5, dtype=torch.float64), torch.randn(sum(sizes), 3, dtype=torch.float64)
    targets = torch.zeros(sum(sizes))
    parts = [slice(0, sizes[0]), slice(sizes[0], sum(sizes))]
    reference = copy.deepcopy(model)
    for part, size in zip(parts, sizes):
        (paired_scores_loss(reference(image[part], text[part]), None).mean() * size / sum(sizes)).backward()
    monitor = AccumulatingNoiseScaleMonitor(model, paired_scores_loss, check_independence=False)
    with pytest.warns(UserWarning, match="could not check whether loss_fn normalises"):   # rows alone: no loss
        monitor.accumulate([((image[part], text[part]), targets[part]) for part in parts])
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_accumulate_does_not_take_sampled_negatives_of_micro_batches_of_two_for_a_token_mean(seed):
    """A sampled softmax whose negatives each call draws anew gives an example other losses alone than together,
    as a count would; a set of two examples, whose halves are single examples, cannot tell the two apart, and was
    refused in 10 seeds of 10 (session 29's review). Micro-batches of two are left to the probe across them, which
    lets this loss through; the step is the split step without the check (float64)."""
    from noisescale.training import AccumulatingNoiseScaleMonitor

    def sampled_negatives(logits, labels):
        first = logits[:, 0]
        negatives = torch.randint(0, first.shape[1], (3,))
        scores = torch.cat([first.gather(1, labels[:, :1]), first[:, negatives]], 1)
        return -scores.log_softmax(1)[:, 0]

    tokens, labels = _token_batch([6, 6, 6, 6], torch.Generator().manual_seed(seed))
    torch.manual_seed(0)
    model = TinyTokenModel().double()
    grads = []
    for checked in (True, False):
        monitor = AccumulatingNoiseScaleMonitor(copy.deepcopy(model), sampled_negatives, check_independence=False)
        monitor._parts_checked = not checked
        torch.manual_seed(seed)
        monitor.accumulate(_parts(tokens, labels, (2, 2)))
        grads.append([p.grad for p in monitor.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("shapes", [[(1, 6), (1, 3), (1, 5), (1, 2)], [(3, 6), (3, 4)], [(2, 6), (2, 4)]],
                         ids=["one sequence each", "alike within, each padded to its own length",
                              "two alike within, each padded to its own length"])
@pytest.mark.parametrize("declared", [None, False, True])
def test_accumulate_says_when_it_cannot_check_across_micro_batches(declared, shapes):
    """A new user's find (session 29): micro-batches of one sequence each, unpadded and of other lengths (one
    example per device with accumulation, the usual LLM setup), or micro-batches alike within and each padded to its
    own length, give the check nothing to compare across them, and a token mean of one's own went through silently,
    p.grad 1.16 and 0.43 off the batch's. It is now said, once, with the way out: a loss declared
    normalised_over_the_batch = True is refused, one declared False (each example's own) is not checked (no
    forward) and its step is the unsplit batch's (float64)."""
    from noisescale.losses import sequence_cross_entropy
    from noisescale.training import AccumulatingNoiseScaleMonitor

    def own_loss(outputs, labels):
        return sequence_cross_entropy(outputs, labels, shift=True, weighting="example" if declared is False else
                                      "token")

    if declared is not None:
        own_loss.normalised_over_the_batch = declared
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 11, shape, generator=generator) for shape in shapes]
    parts = [(tokens, tokens) for tokens in sequences]
    torch.manual_seed(0)
    model = TinyTokenModel().double()
    monitor = AccumulatingNoiseScaleMonitor(copy.deepcopy(model), own_loss, check_independence=False)
    forwards = []
    monitor.model.register_forward_hook(lambda *_: forwards.append(1))
    if declared or declared is None and shapes[0][0] >= 2:   # undeclared: found since session 30 within a micro-batch
        with pytest.raises(ValueError, match=f"accumulated from {len(shapes)} micro-batches"):   # of two or more by
            monitor.accumulate(parts)   # ignoring an example's label tokens, which moves the others' losses
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.accumulate(parts)
        monitor.model.zero_grad(set_to_none=True)
        monitor.accumulate(parts)   # said once
    said = [w for w in caught if "could not check whether loss_fn normalises" in str(w.message)]
    assert len(said) == (1 if declared is None else 0)
    parts_count = len(shapes)   # the check's forwards, once, unless declared
    assert len(forwards) == 2 * parts_count + (parts_count if declared is None else 0)
    if declared is False:   # each example's own: the step is the batch's mean of the examples' losses
        reference = copy.deepcopy(model)
        examples = sum(shape[0] for shape in shapes)
        sum(own_loss(reference(tokens), tokens).sum() for tokens in sequences).div(examples).backward()
        for a, b in zip(monitor.model.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weighting", ["example", "token"])
def test_accumulate_judges_a_batch_with_an_example_without_counted_tokens_on_the_others(weighting):
    """An example whose labels are all ignored has a NaN loss under a mean over its own tokens (0/0) and a finite
    gradient, so the step is taken: the check waited for a finite step, and ran its forward on every split step
    (a review's find). It judges the examples whose loss is finite: a per-example mean passes once (the check's
    forwards on the first step only), a token mean is refused."""
    from noisescale.training import AccumulatingNoiseScaleMonitor

    def own_mean(logits, labels):   # 0/0 for an example without counted tokens under the "example" weighting
        tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        counted = labels != -100
        if weighting == "token":
            return (tokens * counted).sum(1) * labels.shape[0] / counted.sum()
        return (tokens * counted).sum(1) / counted.sum(1)

    torch.manual_seed(0)
    model = TinyTokenModel().double()
    monitor = AccumulatingNoiseScaleMonitor(model, own_mean, check_independence=False)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        tokens, labels = _token_batch([6, 4, 5, 3, 6, 2, 5, 4], generator)
        labels[5] = -100
        if weighting == "token":
            with pytest.raises(ValueError, match="a micro-batch's losses differ"):
                monitor.accumulate(_parts(tokens, labels, (4, 4)))
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # the NaN loss of example 5, said by the monitor
            monitor.accumulate(_parts(tokens, labels, (4, 4)))
        assert monitor.last_step_finite and monitor._parts_checked
        model.zero_grad(set_to_none=True)
    assert len(forwards) == 2 + 2 + 2 + 2   # the check's two forwards on the first step, then the steps' own
