"""NoiseScaleCallback: the real PyTorch Lightning Trainer, a tiny module, CPU, a few steps.

References: the same run without the callback (bit-identical parameters), and the per-example norms of each
optimizer step's whole batch computed one example at a time at the step's weights.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

from _bad_data import assert_named_as_bad_data
from _left_behind import compiles, hooks_on
from _packed import assert_packs_estimate
from _ranks import check_global_batch_history, framework_rank, full_state, spawn_and_load
from noisescale.estimators import (ExponentialMovingNoiseScale, ExponentialMovingRatio,  # noqa: E402
                                   micro_batch_noise_scale, simple_noise_scale)
from noisescale.hessian import hessian_noise_scale  # noqa: E402
from noisescale.integrations.lightning import NoiseScaleCallback  # noqa: E402
from noisescale.integrations.observer import NoiseScaleOptions  # noqa: E402

STEPS = 3


class TinyModule(pl.LightningModule):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loader(shuffle=True):
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # learnable: G^T H G resolves, B_noise is finite
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=shuffle, generator=torch.Generator().manual_seed(2))


class RecordBatches(pl.Callback):
    """Test-only: each optimizer step's micro-batches and the weights at its start."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.steps.append({"weights": copy.deepcopy(pl_module.state_dict()), "batches": []})
        self.steps[-1]["batches"].append([t.clone() for t in batch])


def _fit(tmp_path, accumulation, callbacks, dropout=0.0, make_module=None, loader=None):
    pl.seed_everything(5, verbose=False)
    module = (make_module or TinyModule)(dropout)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=accumulation,
                         logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader or _loader())
    return module, trainer


def _naive_norms(module, x, y):
    """|g_i|^2 one example at a time and |mean_i g_i|^2."""
    parameters = list(module.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        F.cross_entropy(module(x[i:i + 1]), y[i:i + 1]), parameters)]) for i in range(len(x))])
    return grads.square().sum(1), grads.mean(0).square().sum()


def _assert_the_steps_estimate(row, step, rel, population=32):
    """The row's tr(Sigma) and |G|^2 are the per-example loop's on the step's whole batch, at its starting weights,
    drawn without replacement from ``population`` examples (the callback reads the 32 of ``_loader()``'s dataset from
    Lightning's DataLoader; None: no finite-population correction)."""
    module = TinyModule()
    module.load_state_dict(step["weights"])
    x, y = (torch.cat(parts) for parts in zip(*step["batches"]))
    estimate = simple_noise_scale(*_naive_norms(module, x, y), population=population)
    assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=rel)
    assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=rel)


def _per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def test_training_with_dropout_accumulation_and_hessian_proxies_is_bit_identical(tmp_path):
    plain, _ = _fit(tmp_path / "plain", 2, [], dropout=0.3)
    options = NoiseScaleOptions(measure_every=2, hessian_every=1, per_example_loss=_per_example_loss)
    callback = NoiseScaleCallback(options)
    measured, _ = _fit(tmp_path / "measured", 2, [callback], dropout=0.3)
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name
    history = callback.monitor.history
    assert history["measured"].tolist() == [True, False, True]
    assert history["trace_h"].notna().all()  # B_noise on a forked random stream, every step


def test_the_estimate_is_that_of_batches_drawn_without_replacement_from_the_training_set(tmp_path):
    """Lightning's shuffled epochs draw each batch without replacement from the 32 examples: by default the rows are
    the finite-population estimate of the per-example loop (an audit's find: |G|^2 otherwise reads low by
    B_simple/N of itself), N read from Lightning's DataLoader; ``population_size`` given overrides it, None turns the
    correction off, and a sampler drawing with replacement gets none."""
    for options, loader, population in (
            (NoiseScaleOptions(), _loader(), 32),
            (NoiseScaleOptions(population_size=None), _loader(), None),
            (NoiseScaleOptions(population_size=1000), _loader(), 1000),
            (NoiseScaleOptions(), DataLoader(_loader().dataset, batch_size=4, sampler=RandomSampler(
                _loader().dataset, replacement=True, generator=torch.Generator().manual_seed(2))), None)):
        recorder, callback = RecordBatches(), NoiseScaleCallback(options)
        _fit(tmp_path, 2, [recorder, callback], loader=loader)
        assert callback.monitor.population_size == population
        for step, row in zip(recorder.steps, callback.monitor.history.itertuples()):
            _assert_the_steps_estimate(row, step, rel=1e-10, population=population)
    with pytest.raises(ValueError, match="population_size must be >= 2"):
        NoiseScaleOptions(population_size=1)
    with pytest.raises(ValueError, match="population_size must be an int >= 2, 'auto' or None, got 'automatic'"):
        NoiseScaleOptions(population_size="automatic")


class GrowingData(pl.LightningDataModule):
    """A training set that grows each epoch, reloaded by Lightning (``reload_dataloaders_every_n_epochs=1``)."""

    def __init__(self):
        super().__init__()
        self.sizes = iter((12, 40))

    def train_dataloader(self):
        size = next(self.sizes)
        x = torch.randn(size, 6, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, drop_last=True, shuffle=True)


def test_a_training_set_lightning_reloads_at_another_size_is_read_again_with_a_warning(tmp_path):
    """N is read from the DataLoader as each epoch starts: 12 examples, then 40. Before, N was read once (a review's
    find: a set growing from 6 to 40 failed its first step with 8 > 6, one shrinking from 40 to 12 was corrected with
    40)."""
    callback, populations = NoiseScaleCallback(), []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            populations.append(callback.monitor.population_size)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, reload_dataloaders_every_n_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, Record()])
    with pytest.warns(RuntimeWarning, match="taken with population_size=12, and the steps from now on with 40"):
        trainer.fit(TinyModule(), datamodule=GrowingData())
    assert populations == [12, 40]
    assert callback.monitor.history["batch_size"].tolist() == [8] + [8] * 5


def test_a_fit_from_a_finished_checkpoint_keeps_the_monitor_of_its_averages(tmp_path):
    """A fit whose checkpoint has already reached max_steps trains nothing (Lightning skips its loop): the callback
    still holds the checkpoint's monitor (a review's find: it was None when the monitor was made as training
    started)."""
    callback = NoiseScaleCallback()
    _, trainer = _fit(tmp_path / "first", 1, [callback])
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    again = NoiseScaleCallback()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[again])
    trainer.fit(TinyModule(), _loader(), ckpt_path=tmp_path / "done.ckpt")
    assert again.monitor.step == STEPS and again.monitor.population_size == 32
    assert again.monitor.summary().trace_sigma == callback.monitor.summary().trace_sigma


class BatchNormModule(TinyModule):
    def __init__(self, dropout=0.0):
        super().__init__(dropout)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_a_batch_norm_module_is_measured_from_its_accumulated_micro_batches(tmp_path):
    """BatchNorm in train mode: no per-example gradient, so each accumulated micro-batch (normalised by its own
    statistics) is a unit. tr(Sigma) and |G|^2 equal (sum_k b_k |g_k|^2 - B |g|^2) / (K - 1) and |g|^2 - tr(Sigma)/B
    from each micro-batch's gradient taken alone; training is bit-identical to the run without the callback."""
    plain, _ = _fit(tmp_path / "plain", 2, [], make_module=BatchNormModule)
    recorder, callback = RecordBatches(), NoiseScaleCallback(NoiseScaleOptions())
    measured, _ = _fit(tmp_path / "measured", 2, [recorder, callback], make_module=BatchNormModule)
    for (name, expected), actual in zip(plain.state_dict().items(), measured.state_dict().values()):
        assert torch.equal(expected, actual), name
    history = callback.monitor.history
    assert history["micro_batches"].tolist() == [2] * STEPS
    for step, row in zip(recorder.steps, history.itertuples()):
        module = BatchNormModule()
        module.load_state_dict(step["weights"])
        gradients = [torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(module(x), y),
                                                                           list(module.parameters()))])
                     for x, y in step["batches"]]
        batch_gradient = (gradients[0] + gradients[1]) / 2
        noise = (4 * gradients[0].square().sum() + 4 * gradients[1].square().sum() - 8 * batch_gradient.square().sum())
        # drawn without replacement from the 32 examples: tr(Sigma) = S (N - 1) / N, |G|^2 = |g|^2 - S / B + S / N
        assert row.trace_sigma == pytest.approx((noise * 31 / 32).item(), rel=1e-10)
        assert row.grad_sqnorm == pytest.approx((batch_gradient.square().sum() - noise / 8 + noise / 32).item(),
                                                rel=1e-10)


def test_a_step_of_micro_batches_of_unequal_sizes_is_left_unmeasured_with_a_warning(tmp_path):
    """30 examples in batches of 4, accumulating 2: the epoch's last step holds 4 and 2 examples, and Lightning
    weights both mean losses 1/2, so that step's gradient is not its examples' mean and the per-example gradients
    cannot be recovered (before: a new user's tr(Sigma) 6.10 against 4.52). It is recorded unmeasured, warned once."""
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)
    callback = NoiseScaleCallback(NoiseScaleOptions())
    pl.seed_everything(5, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    with pytest.warns(RuntimeWarning, match=r"micro-batches differ in size \(\[4, 2\]\)"):
        trainer.fit(TinyModule(), loader)
    history = callback.monitor.history
    assert history["batch_size"].tolist() == [8, 8, 8, 6]
    assert history["measured"].tolist() == [True, True, True, False]
    assert history["trace_sigma"].iloc[:3].notna().all() and math.isnan(history["trace_sigma"].iloc[3])


def test_an_epochs_last_shorter_window_of_equal_micro_batches_is_measured_at_its_examples_scale(tmp_path):
    """20 examples in batches of 4, accumulating 2: the epoch's last step holds one micro-batch, whose loss
    Lightning still divides by 2. Its tr(Sigma) and |G|^2 were logged at 1/4 of its examples' (a new user's trial),
    and its loss at 1/2; they now are the per-example loop's, as every other step's."""
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=4)
    recorder, callback = RecordBatches(), NoiseScaleCallback(NoiseScaleOptions())
    pl.seed_everything(5, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder, callback])
    trainer.fit(TinyModule(), loader)
    history = callback.monitor.history
    assert history["batch_size"].tolist() == [8, 8, 4] and history["micro_batches"].tolist() == [2, 2, 1]
    for step, row in zip(recorder.steps, history.itertuples()):
        _assert_the_steps_estimate(row, step, rel=1e-10, population=20)
        module = TinyModule()
        module.load_state_dict(step["weights"])
        x_step, y_step = (torch.cat(parts) for parts in zip(*step["batches"]))
        assert row.loss == pytest.approx(F.cross_entropy(module(x_step), y_step).item(), rel=1e-10)


class SkippingModule(TinyModule):
    """Skips its second batch (training_step returns None: Lightning takes no backward for it)."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("accumulation", [2, 1])
def test_a_micro_batch_the_module_skips_is_not_counted_in_its_step(tmp_path, accumulation):
    """Accumulating 2, the first step's second micro-batch is skipped: the step trained on its first micro-batch
    alone, whose loss Lightning divides by 2 all the same. Its row counts 4 examples and gives their estimate (a
    review's find: the skipped micro-batch counted in k, so the step read at a quarter of its scale). Without
    accumulation the skipped batch is a whole step, which trains nothing and gets no row (fit crashed in the
    callback's torch.cat of no norms: an integrations survey's find), and training is as without the callback."""
    recorder, callback = RecordBatches(), NoiseScaleCallback(NoiseScaleOptions())
    modules = []
    for callbacks in ([], [recorder, callback]):
        pl.seed_everything(5, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3 - accumulation // 2,
                             accumulate_grad_batches=accumulation, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        modules.append(SkippingModule())
        trainer.fit(modules[-1], _loader(shuffle=False))
    for p, q in zip(*(module.parameters() for module in modules)):
        assert torch.equal(p, q)
    history = callback.monitor.history
    if accumulation == 2:
        assert history["batch_size"].tolist() == [4, 8] and history["micro_batches"].tolist() == [1, 2]
        recorder.steps[0]["batches"] = recorder.steps[0]["batches"][:1]   # the skipped one trained nothing
    else:
        assert history["batch_size"].tolist() == [4, 4] and history["micro_batches"].tolist() == [1, 1]
        del recorder.steps[1]
    for step, row in zip(recorder.steps, history.itertuples()):
        _assert_the_steps_estimate(row, step, rel=1e-10)


def test_a_compiled_module_is_measured_eagerly_and_trains_as_the_compiled_one(tmp_path):
    """``trainer.fit(torch.compile(module))``: Lightning compiles the module's forward and training_step in place
    (``from_compiled``). Before, the first measured step failed inside Dynamo, which traced the hooks; now the
    measured steps run them eagerly (aot_eager: Dynamo and AOTAutograd without inductor's C++ code generation)."""
    def fit(path, callbacks):
        pl.seed_everything(5, verbose=False)
        module = TinyModule()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(torch.compile(module, backend="aot_eager"), _loader())
        assert hasattr(module, "_compiler_ctx")   # compiled in place
        return module

    torch._dynamo.reset()
    plain = fit(tmp_path / "plain", [])
    recorder, callback = RecordBatches(), NoiseScaleCallback(NoiseScaleOptions(measure_every=2))
    measured = fit(tmp_path / "measured", [recorder, callback])
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name
    history = callback.monitor.history
    assert history["measured"].tolist() == [True, False, True]
    for step, row in zip(recorder.steps, history.itertuples()):
        if not row.measured:
            continue
        _assert_the_steps_estimate(row, step, rel=1e-10)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_training_is_bit_identical_and_the_logged_noise_scale_is_that_of_each_optimizer_steps_batch(
        tmp_path, accumulation):
    plain, _ = _fit(tmp_path / "plain", accumulation, [])
    options = NoiseScaleOptions(ema_decay=0.5, hessian_every=1, per_example_loss=_per_example_loss)
    recorder, callback = RecordBatches(), NoiseScaleCallback(options)
    measured, trainer = _fit(tmp_path / "measured", accumulation, [recorder, callback])
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name

    average, curvature_average = ExponentialMovingNoiseScale(0.5), ExponentialMovingRatio(0.8)
    expected, curvature, logged_only = [], [], []
    for k, step in enumerate(recorder.steps):
        module = TinyModule()
        module.load_state_dict(step["weights"])
        x, y = (torch.cat(parts) for parts in zip(*step["batches"]))
        sqnorms, grad_sqnorm = _naive_norms(module, x, y)
        estimate = simple_noise_scale(sqnorms, grad_sqnorm, population=32)
        average.update_estimate(estimate)
        # B_noise: the Hessian proxies of the step's whole batch (its equal micro-batches are its halves), probes
        # seeded with seed + step, with the same finite-population correction
        proxies = hessian_noise_scale(module, _per_example_loss, x, y, generator=torch.Generator().manual_seed(k),
                                      population=32)
        curvature_average.update(proxies.trace_h_sigma, proxies.g_h_g)
        curvature.append({"trace_h_sigma": proxies.trace_h_sigma, "g_h_g": proxies.g_h_g, "trace_h": proxies.trace_h})
        expected.append({"noise_scale/grad_sqnorm": average.grad_sqnorm, "noise_scale/trace_sigma": average.trace_sigma,
                         "noise_scale/b_simple": average.b_simple, "noise_scale/b_noise": curvature_average.ratio})
        expected[-1].update(zip(("noise_scale/b_simple_low", "noise_scale/b_simple_high"), average.interval(0.9)))
        # logged only: B_noise's interval, where its ratio is positive (no b_noise_high while unresolved)
        logged_only.append(dict(zip(("noise_scale/b_noise_low", "noise_scale/b_noise_high"),
                                    curvature_average.interval(0.9) if curvature_average.ratio > 0
                                    else (math.nan, math.nan))))
    history = callback.monitor.history
    assert callback.monitor.adaptive_optimizer is False   # the module's SGD: B_noise is suggested
    assert list(history["batch_size"]) == [4 * accumulation] * STEPS
    assert list(history["micro_batches"]) == [accumulation] * STEPS
    columns = {"noise_scale/grad_sqnorm": "grad_sqnorm_ema", "noise_scale/trace_sigma": "trace_sigma_ema",
               "noise_scale/b_simple": "b_simple", "noise_scale/b_simple_low": "b_simple_low",
               "noise_scale/b_simple_high": "b_simple_high", "noise_scale/b_noise": "b_noise"}
    for (_, row), reference, proxies in zip(history.iterrows(), expected, curvature):
        for key, value in reference.items():
            assert row[columns[key]] == pytest.approx(value, rel=1e-9, nan_ok=True), key
        for key, value in proxies.items():
            assert row[key] == pytest.approx(value, rel=1e-9), key

    with open(trainer.logger.experiment.metrics_file_path) as file:
        logged = [row for row in csv.DictReader(file)]
    assert len(logged) == STEPS
    for row, reference, bounds in zip(logged, expected, logged_only):
        for key, value in {**reference, **bounds}.items():
            if math.isfinite(value):  # Lightning logs float32
                assert float(row[key]) == pytest.approx(value, rel=1e-6), key
            else:  # not resolved yet: not logged
                assert row.get(key, "") == "", key
    final = {key: value for key, value in expected[-1].items() if math.isfinite(value)}
    assert {key: float(trainer.logged_metrics[key]) for key in final} == pytest.approx(final, rel=1e-6)


class CheckpointedModule(TinyModule):
    """TinyModule with its layers after the first under torch.utils.checkpoint (the first outside it, so that a
    reentrant checkpoint's input requires grad)."""

    use_reentrant = False

    def forward(self, x):
        return checkpoint(self.net[1:], self.net[0](x), use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_module_with_activation_checkpointing_is_measured_as_without_it(tmp_path, monkeypatch, use_reentrant):
    """Checkpointing recomputes the same values: training through the callback is bit-identical to the module
    without checkpointing, and the history (B_simple's parts, B_noise's Hessian proxies) equals that run's, which
    the test above checks against the per-example loop. B_noise raised on a checkpointed module before."""
    monkeypatch.setattr(CheckpointedModule, "use_reentrant", use_reentrant)
    histories = []
    for name, make_module in (("plain", TinyModule), ("checkpointed", CheckpointedModule)):
        options = NoiseScaleOptions(hessian_every=1, per_example_loss=_per_example_loss)
        callback = NoiseScaleCallback(options)
        module, _ = _fit(tmp_path / name, 2, [callback], make_module=make_module)
        histories.append((module, callback.monitor.history))
    (plain, expected), (measured, history) = histories
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name
    columns = ["grad_sqnorm", "trace_sigma", "trace_h", "g_h_g", "trace_h_sigma"]
    assert history[columns].to_numpy() == pytest.approx(expected[columns].to_numpy(), rel=1e-12)


class SharedWeightModule(TinyModule):
    """Its last step reads ``mix``'s weight outside ``mix``'s call: no hook sees it per example, so the
    whole-model vmap measures it, on the inputs of the module's one call in the training step."""

    def __init__(self, dropout=0.0):
        super().__init__(dropout)
        self.mix = nn.Linear(3, 3, bias=False).double()

    def forward(self, x):
        return F.linear(self.net(x), self.mix.weight)


def test_a_parameter_only_vmap_can_measure_is_measured_from_the_output_gradients(tmp_path):
    """Lightning passes no model inputs: observe keeps those of the module's call and the gradient the step's
    backward brought to its output. The step's estimates are the per-example loop's; training is bit-identical."""
    runs = {}
    for name, callbacks in (("plain", []), ("measured", [RecordBatches(), NoiseScaleCallback()])):
        pl.seed_everything(5, verbose=False)
        module = SharedWeightModule()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks)
        trainer.fit(module, _loader())
        runs[name] = (module, callbacks)
    (plain, _), (measured, (recorder, callback)) = runs["plain"], runs["measured"]
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name
    for step, row in zip(recorder.steps, callback.monitor.history.itertuples()):
        module = SharedWeightModule()
        module.load_state_dict(step["weights"])
        x, y = (torch.cat(parts) for parts in zip(*step["batches"]))
        parameters = list(module.parameters())
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            F.cross_entropy(module(x[i:i + 1]), y[i:i + 1]), parameters)]) for i in range(len(x))])
        estimate = simple_noise_scale(grads.square().sum(1), grads.mean(0).square().sum(), population=32)
        assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=1e-9)
        assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=1e-9)


def test_manual_optimization_is_rejected_with_a_clear_error(tmp_path):
    class Manual(TinyModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[NoiseScaleCallback()])
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer.fit(Manual(), _loader())


class PenalisedModule(TinyModule):
    """An L2 penalty added to the loss in training_step, outside every call of the module's layers."""

    coefficient = 0.1

    def training_step(self, batch, batch_idx):
        penalty = sum(p.square().sum() for p in self.parameters())
        return super().training_step(batch, batch_idx) + self.coefficient * penalty


def test_a_weight_penalty_in_the_training_step_is_warned_about(tmp_path):
    """The penalty's gradient belongs to no example: the per-example norms leave it out and the batch's gradient holds
    it. Before, nothing said so, and a review's per-example loop (g_i = the example's gradient + the penalty's) read
    tr(Sigma) 2.92 and |G|^2 0.864 at the second step where the callback logged 2.40 and 0.981. Now the first step
    warns, naming the parameters; training is unchanged, and the module without the penalty is not warned about."""
    plain, _ = _fit(tmp_path / "plain", 1, [], make_module=lambda dropout: PenalisedModule())
    with pytest.warns(RuntimeWarning, match=r"the loss reads parameters outside the model's module calls \(net.0.bias, "
                                            r"net.0.weight, net.3.bias, net.3.weight\).*weight_decay"):
        measured, _ = _fit(tmp_path / "measured", 1, [NoiseScaleCallback()],
                           make_module=lambda dropout: PenalisedModule())
    for p, q in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(p, q)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the loss reads parameters")
        _fit(tmp_path / "unpenalised", 2, [NoiseScaleCallback()])


def test_a_step_whose_gradient_its_examples_cannot_make_is_left_unmeasured_and_training_goes_on(tmp_path,
                                                                                               monkeypatch):
    """With a penalty of 1 |theta|^2 the batch's |gbar|^2 (16.7) exceeds its examples' mean |g_i|^2 (1.85), which no
    mean of them can: before, the estimator's ValueError ('was the loss summed instead of averaged') stopped fit()
    at the first step, where the run without the callback trains on. Now such steps are recorded unmeasured,
    warned once, and training is bit-identical to the run without the callback."""
    monkeypatch.setattr(PenalisedModule, "coefficient", 1.0)
    plain, _ = _fit(tmp_path / "plain", 1, [], make_module=lambda dropout: PenalisedModule())
    callback = NoiseScaleCallback()
    with pytest.warns(RuntimeWarning, match=r"step 0: the batch's gradient \(\|gbar\|\^2 = 16.69\) is larger than "
                                            r"its examples' gradients allow \(their mean \|g_i\|\^2 = 1.853\)"):
        measured, _ = _fit(tmp_path / "measured", 1, [callback], make_module=lambda dropout: PenalisedModule())
    for p, q in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(p, q)
    assert callback.monitor.history["measured"].tolist() == [False] * STEPS


def test_sequences_packed_into_rows_are_measured_from_the_micro_batches_as_examples(tmp_path):
    """A tiny GPT-2 in a LightningModule fed by transformers' DataCollatorWithFlattening: each micro-batch of 4
    sequences is one row (1, T) with position_ids restarting at each. Before, the row was taken for one example,
    silently: batch_size 2 a step of 8 sequences, tr(Sigma) 2.85 and |G|^2 -0.22 at the first step, where a
    per-sequence loop read 9.84 and 0.285. Now its sequences are counted and the step is measured from its
    micro-batches' gradients: the micro-batch estimator of the two packs (each micro-batch's mean token loss divided
    by Lightning's 2), training bit-identical."""
    transformers = pytest.importorskip("transformers")

    class PackedLanguageModel(pl.LightningModule):
        def __init__(self, dropout=0.0):
            super().__init__()
            torch.manual_seed(0)
            config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                             resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                             bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                                             use_cache=False)   # without a cache its masks see the packing
            self.model = transformers.GPT2LMHeadModel(config).double()

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    generator = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(1, 32, (3 + i % 6,), generator=generator).tolist()} for i in range(24)]

    def loader():
        return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2),
                          collate_fn=transformers.DataCollatorWithFlattening())

    class RecordDictBatches(RecordBatches):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % trainer.accumulate_grad_batches == 0:
                self.steps.append({"weights": copy.deepcopy(pl_module.state_dict()), "batches": []})
            self.steps[-1]["batches"].append({key: value.clone() for key, value in batch.items()})

    plain, _ = _fit(tmp_path / "plain", 2, [], make_module=PackedLanguageModel, loader=loader())
    recorder, callback = RecordDictBatches(), NoiseScaleCallback()
    with pytest.warns(RuntimeWarning, match="step 0: its micro-batch packs 4 sequences into rows"):
        measured, _ = _fit(tmp_path / "measured", 2, [recorder, callback], make_module=PackedLanguageModel,
                           loader=loader())
    for p, q in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(p, q)
    history = callback.monitor.history
    assert history["batch_size"].tolist() == [8] * STEPS
    for step, row in zip(recorder.steps, history.itertuples()):
        module = PackedLanguageModel()
        module.load_state_dict(step["weights"])
        parameters = list(module.parameters())
        contributions = [torch.cat([g.flatten() for g in torch.autograd.grad(module(**batch).loss / 2, parameters)])
                         for batch in step["batches"]]
        assert_packs_estimate(row, contributions, [4, 4], population=24)


class LBFGSModule(TinyModule):
    """LBFGS, which calls Lightning's closure (training_step and its backward) several times in one step."""

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_an_optimizer_that_runs_the_closure_again_leaves_each_row_the_step_s_first_pass(tmp_path):
    """LBFGS runs Lightning's closure up to max_iter times a step; the row is recorded at the first (its
    on_before_optimizer_step), and each later backward's on_after_backward, with no micro-batch open, added its
    loss to the next step's row: losses 3.35 and 4.70 where the step's batch at its start weights gave 1.71 and
    0.50. Now such a backward is left alone: each row's loss and estimate are those of the step's batch at its
    start weights (a loop over single examples)."""
    recorder, callback = RecordBatches(), NoiseScaleCallback()
    _fit(tmp_path, 1, [recorder, callback], make_module=lambda dropout: LBFGSModule())
    history = callback.monitor.history
    assert len(history) == STEPS
    for step, row in zip(recorder.steps, history.itertuples()):
        module = TinyModule()
        module.load_state_dict(step["weights"])
        x, y = (torch.cat(parts) for parts in zip(*step["batches"]))
        with torch.no_grad():
            assert row.loss == pytest.approx(F.cross_entropy(module(x), y).item(), rel=1e-12)
        _assert_the_steps_estimate(row, step, rel=1e-9)


# ---------------------------------------------------------------------------------------------- DDP, 2 gloo ranks
WORLD_SIZE = 2


def _ddp_worker(rank, out_dir):
    """One rank of Lightning's ddp strategy (the environment variables say the processes exist already): a run
    without the callback and one with it, same seed; parameters, history and batches saved for the test."""
    framework_rank(rank, WORLD_SIZE, out_dir)
    results = {}
    for prefix, make_module in (("", TinyModule), ("batch_norm_", BatchNormModule)):
        for name in ("plain", "measured"):
            recorder, callback = RecordBatches(), NoiseScaleCallback(NoiseScaleOptions(ema_decay=0.5))
            pl.seed_everything(5, verbose=False)
            module = make_module()
            trainer = pl.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy="ddp", max_steps=STEPS,
                                 accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False,
                                 callbacks=[recorder, callback] if name == "measured" else [])
            trainer.fit(module, _loader(shuffle=False))
            results[prefix + name] = [p.detach().clone() for p in module.parameters()]
        results[prefix + "history"], results[prefix + "steps"] = callback.monitor.history, recorder.steps
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _check_the_global_batch_history(ranks: list[dict]) -> None:
    """TinyModule on 2 ranks, accumulation 2: training bit-identical, and every rank's history that of the global
    batches (drawn without replacement from the 32 examples by Lightning's DistributedSampler), against the per-example
    loop at each step's weights."""

    def global_norms(k):
        module = TinyModule()
        module.load_state_dict(ranks[0]["steps"][k]["weights"])
        x, y = (torch.cat(parts) for parts in zip(*(b for r in ranks for b in r["steps"][k]["batches"])))
        return _naive_norms(module, x, y)

    check_global_batch_history(ranks, [WORLD_SIZE * 2 * 4] * STEPS, lambda k: simple_noise_scale(*global_norms(k), population=32),
                               1e-9)


def test_under_ddp_every_rank_logs_the_estimate_of_the_global_batch_and_training_is_bit_identical(tmp_path, hang_deadline_s):
    ranks = spawn_and_load(_ddp_worker, WORLD_SIZE, tmp_path, hang_deadline_s)
    _check_the_global_batch_history(ranks)

    def global_micro_batches(k):
        """BatchNorm: the 2 micro-batches of 4 of each of the 2 ranks are the 4 units of step k's global batch."""
        module = BatchNormModule()
        module.load_state_dict(ranks[0]["batch_norm_steps"][k]["weights"])
        gradients = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            F.cross_entropy(module(x), y), list(module.parameters()))])
            for r in ranks for x, y in r["batch_norm_steps"][k]["batches"]])
        return micro_batch_noise_scale(gradients.square().sum(1), [4] * 4, gradients.mean(0).square().sum(),
                                       population=32)

    check_global_batch_history(ranks, [WORLD_SIZE * 2 * 4] * STEPS, global_micro_batches, 1e-9, prefix="batch_norm_")


def test_a_run_resumed_from_a_checkpoint_continues_the_averages(tmp_path):
    callback = NoiseScaleCallback(NoiseScaleOptions(ema_decay=0.5))
    _, trainer = _fit(tmp_path / "first", 1, [callback])
    trainer.save_checkpoint(tmp_path / "step3.ckpt")  # loaded below with torch.load(weights_only=True)
    resumed = NoiseScaleCallback(NoiseScaleOptions(ema_decay=0.5))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2 * STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed])
    trainer.fit(TinyModule(), _loader(), ckpt_path=tmp_path / "step3.ckpt")
    assert resumed.monitor.step == 2 * STEPS
    history = resumed.monitor.history
    assert history.iloc[:STEPS].equals(callback.monitor.history)
    assert history["step"].tolist() == list(range(2 * STEPS))
    average = ExponentialMovingNoiseScale(0.5)  # the averages over all six steps, not restarted at the resume
    for row in history.itertuples():
        average.update(row.trace_sigma, row.grad_sqnorm)
    assert resumed.monitor.summary().b_simple == pytest.approx(average.b_simple, rel=1e-12)


def test_a_fit_resumed_from_a_checkpoint_without_the_callback_numbers_its_rows_by_lightnings_step(tmp_path):
    """A new user's find: the history had no global_step column (the HF Trainer's has), so after a resume from a
    checkpoint written without the callback its step restarted at 0 while Lightning's was 3, and its rows could not
    be joined with Lightning's logs. The rows now carry Lightning's step (its loggers' step); the averages start
    anew there, each row the per-example loop's estimate of its step."""
    _, trainer = _fit(tmp_path / "plain", 1, [])
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    callback, batches = NoiseScaleCallback(NoiseScaleOptions(ema_decay=0.5)), RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2 * STEPS, logger=pl.loggers.CSVLogger(tmp_path),
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, batches])
    trainer.fit(TinyModule(), _loader(), ckpt_path=tmp_path / "plain.ckpt")
    history = callback.monitor.history
    assert history["step"].tolist() == [0, 1, 2] and history["global_step"].tolist() == [3, 4, 5]
    assert callback.monitor.average.num_updates == STEPS
    for row in history.itertuples():
        _assert_the_steps_estimate(row, batches.steps[row.step], 1e-9)
    with open(trainer.logger.experiment.metrics_file_path) as file:
        logged = [row for row in csv.DictReader(file) if row["noise_scale/trace_sigma"]]
    assert [int(row["step"]) for row in logged] == history["global_step"].tolist()


class InterruptedModule(TinyModule):
    """Raises in the forward of optimizer step 1's second micro-batch (once), as a bad batch would."""

    def forward(self, x):
        if self.training and self.trainer.global_step == 1 and not hasattr(self, "interrupted"):
            self.step_1_calls = getattr(self, "step_1_calls", 0) + 1
            if self.step_1_calls == 2:
                self.interrupted = True
                raise RuntimeError("a bad batch")
        return super().forward(x)


def test_an_exception_in_fit_leaves_the_module_and_the_process_as_they_were(tmp_path):
    """Before, an exception escaping fit() left the monitor's hooks on the module (on_fit_end never ran), its
    pass armed and the process in torch.compile's force_eager stance (no compile called its backend any more)."""
    accumulation, callback, module = 2, NoiseScaleCallback(), InterruptedModule()
    assert compiles()
    with pytest.raises(RuntimeError, match="a bad batch"):
        _fit(tmp_path, accumulation, [callback], make_module=lambda dropout: module)
    assert compiles()
    assert hooks_on(module) == {}
    assert callback.monitor.step == 1   # step 0; step 1 was abandoned

    recorder = RecordBatches()   # a second fit of the same module measures its steps from where the first stopped
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=accumulation,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[recorder, callback])
    trainer.fit(module, _loader())
    assert hooks_on(module) == {}
    history = callback.monitor.history
    assert history["step"].tolist() == [0, 1, 2]
    assert history["micro_batches"].tolist() == [accumulation] * 3
    for row, step in zip(history.iloc[1:].itertuples(), recorder.steps):
        _assert_the_steps_estimate(row, step, rel=1e-9)


class HugeStepModule(TinyModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e6)


def test_a_batch_holding_nan_is_named_as_bad_data_and_a_huge_learning_rate_still_reads_diverged(tmp_path):
    """One example's input is NaN: the row of the step whose batch holds it (one of its two micro-batches) names it
    (nonfinite_data), and so do the warning and the summary; the steps after it, whose parameters Lightning's
    optimizer step on its NaN gradient broke, are blamed on it. Before, the callback kept no batch and the run read
    as diverged (lower the learning rate). On finite data a huge learning rate still diverges."""
    loader, recorder, callback = _loader(), RecordBatches(), NoiseScaleCallback()
    loader.dataset.tensors[0][5, 2] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "nan", 2, [recorder, callback], loader=loader)
    step = next(k for k, recorded in enumerate(recorder.steps)
                if any(x.isnan().any() for x, _ in recorded["batches"]))
    named = "NaN in its inputs (1 value)"
    assert_named_as_bad_data(callback.monitor, caught, step, named)

    callback = NoiseScaleCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path / "huge", 2, [callback], make_module=HugeStepModule)
    summary = callback.monitor.summary()
    assert summary.divergence is not None and summary.bad_data is None and "diverged" in str(summary)


# ------------------------------------------------------------------- FSDP2 under ModelParallelStrategy, 2 gloo ranks
class ShardedModule(TinyModule):
    """TinyModule sharded by FSDP2 in ``configure_model`` (each nn.Linear, then the module), as Lightning's
    ModelParallelStrategy asks; Lightning's FSDPStrategy (FSDP1) refuses accelerator='cpu'."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class RecordFullBatches(RecordBatches):
    """RecordBatches with the full (unsharded) weights, gathered on every rank."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.steps.append({"weights": full_state(pl_module), "batches": []})
        self.steps[-1]["batches"].append([t.clone() for t in batch])


def _fsdp2_worker(rank, out_dir):
    """One rank of ModelParallelStrategy(data_parallel_size=2): a run without the callback and one with it."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    framework_rank(rank, WORLD_SIZE, out_dir)
    results = {}
    for name in ("plain", "measured"):
        recorder, callback = RecordFullBatches(), NoiseScaleCallback(NoiseScaleOptions(ema_decay=0.5))
        pl.seed_everything(5, verbose=False)
        module = ShardedModule()
        trainer = pl.Trainer(accelerator="cpu", devices=WORLD_SIZE, max_steps=STEPS, accumulate_grad_batches=2,
                             strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[recorder, callback] if name == "measured" else [])
        trainer.fit(module, _loader(shuffle=False))
        weights = full_state(module)
        results[name] = [weights[key] for key in sorted(weights)]
    results["history"], results["steps"] = callback.monitor.history, recorder.steps
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_fsdp2_under_model_parallel_strategy_logs_the_global_estimate_and_training_is_bit_identical(
        tmp_path, hang_deadline_s):
    """FSDP2 (fully_shard in configure_model) under Lightning's ModelParallelStrategy on 2 gloo ranks: the history
    is that of the global batch, equal to the unsharded per-example loop (float64), and training is bit-identical
    to the run without the callback."""
    _check_the_global_batch_history(spawn_and_load(_fsdp2_worker, WORLD_SIZE, tmp_path, hang_deadline_s))


class SequenceFirstModule(pl.LightningModule):
    """A GRU on sequence-first inputs (T, B, 3) (torch's default layout), targets (B,)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.GRU(3, 5).double(), nn.Linear(5, 2).double()

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _sequence_first_loader(lengths, batch_size=4):
    """16 examples of 5 steps in batches (T, B, 3) whose k-th batch keeps the first lengths[k % len] steps."""
    x = torch.randn(16, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (x[:, :, 0].sum(1) > 0).long()
    calls = iter(range(10 ** 6))

    def collate(examples):
        steps = lengths[next(calls) % len(lengths)]
        return torch.stack([e[0][:steps] for e in examples], 1), torch.stack([e[1] for e in examples])
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, collate_fn=collate)


def _fit_sequence_first(callbacks, lengths, steps=3):
    pl.seed_everything(5, verbose=False)
    module = SequenceFirstModule()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, _sequence_first_loader(lengths))
    return module


def test_a_sequence_first_batch_is_measured_along_its_examples_found_from_the_targets(tmp_path):
    """Inputs (T, B, 3) with T = 3 != B = 4 and targets (4,): the examples are dim 1, found from the targets. Before,
    the callback took T = 3 from dim 0 and stopped the fit with a ValueError about graphs and EmbeddingBags; now each
    step's tr(Sigma) and |G|^2 are the per-example loop's (float64, one forward and backward per example; equal to
    2.2e-16 relative), and training is bit-identical to the plain fit."""
    plain = _fit_sequence_first([], [3])
    recorder, callback = RecordBatches(), NoiseScaleCallback()
    measured = _fit_sequence_first([recorder, callback], [3])
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name
    history = callback.monitor.history
    assert history["batch_size"].tolist() == [4, 4, 4] and history["measured"].all()
    for step, row in zip(recorder.steps, history.itertuples()):
        module = SequenceFirstModule()
        module.load_state_dict(step["weights"])
        (x, y), = step["batches"]
        parameters = list(module.parameters())
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            F.cross_entropy(module(x[:, i:i + 1]), y[i:i + 1]), parameters)]) for i in range(4)])
        estimate = simple_noise_scale(grads.square().sum(1), grads.mean(0).square().sum(), population=16)
        assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=1e-12)
        assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=1e-12)


def test_a_sequence_first_batch_as_long_as_its_sequence_is_unmeasured_or_warned_never_silently_measured(tmp_path):
    """T == B = 4: the batch's shapes do not tell its examples (dim 1) from its positions (dim 0). Before, the
    callback measured along the positions (per-example norms 0.12x to 3.0x the loop's on this GRU, tr(Sigma) of
    another quantity) with warnings that named neither sequence-first batches nor a remedy. Now: with
    ``batch_first=False``, or once an earlier batch of the fit (T = 3) showed the layout, such a step is recorded
    unmeasured with a warning that says why; with nothing known, the step is taken batch-first with a warning
    naming the sequence-first case and ``batch_first=False``. Training is bit-identical to the plain fit throughout."""
    plain = _fit_sequence_first([], [4])
    callback = NoiseScaleCallback(batch_first=False)
    with pytest.warns(RuntimeWarning, match=r"sequence-first batch \(shapes \(4, 4, 3\), \(4,\)\) has a sequence as "
                                            r"long as the batch \(4\).*not measured"):
        measured = _fit_sequence_first([callback], [4])
    assert callback.monitor.history["measured"].tolist() == [False, False, False]
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name

    callback = NoiseScaleCallback()   # T = 3, then 4 = B: found sequence-first by the first batch
    with pytest.warns(RuntimeWarning, match=r"step 1: its sequence-first batch .* not measured"):
        _fit_sequence_first([callback], [3, 4])
    history = callback.monitor.history
    assert history["measured"].tolist() == [True, False, True] and history["batch_size"].tolist() == [4, 4, 4]

    callback = NoiseScaleCallback()   # T == B from the first batch: ambiguous, warned
    with pytest.warns(RuntimeWarning, match=r"If the batch is sequence-first.*NoiseScaleCallback\(batch_first=False\)"):
        _fit_sequence_first([callback], [4], steps=1)
    with pytest.raises(TypeError, match="batch_first must be None, True or False"):
        NoiseScaleCallback(batch_first=1)


def test_a_batch_first_model_whose_features_are_as_many_as_the_examples_is_not_warned_about():
    """Inputs (6, 6) to an MLP: dim 1 holds B = 6 features by chance. The sequence-first warning is for modules
    with a layer that takes (T, B, ...) (a review found it given to any input with B in dim 1); here none."""
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=6)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[NoiseScaleCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyModule(), loader)
    assert not [w for w in caught if "sequence-first" in str(w.message)]


class PerStepModule(SequenceFirstModule):
    """The GRU with a head at every step: targets (T, B), a per-step loss, sequence-first like the inputs."""

    def forward(self, x):
        return self.head(self.rnn(x)[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())


def test_sequence_first_targets_are_warned_about_where_the_module_takes_sequence_first_inputs():
    """Inputs (3, 4, 3) and per-step targets (3, 4): every tensor agrees in dim 0, so the batch is taken with B = 3,
    the positions (tr(Sigma) 0.230 against the loop's 0.355 in a review's script), and nothing but the independence
    check's coupling warning said so. Now a warning names the module's sequence-first layer and batch_first=False,
    before the first step; a batch-first model with targets of 2 dims is not warned about (the MLP test above)."""
    x = torch.randn(8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (x[..., 0] > 0).long()

    def collate(examples):
        return torch.stack([e[0] for e in examples], 1), torch.stack([e[1] for e in examples], 1)

    loader = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=collate)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[NoiseScaleCallback()])
    with pytest.warns(RuntimeWarning, match=r"layers \['rnn'\] take sequence-first inputs by default, and this "
                                            r"batch's targets have 2 dims or more .*batch_first=False"):
        trainer.fit(PerStepModule(), loader)


class SequenceFirstTransformer(SequenceFirstModule):
    """nn.TransformerEncoder without batch_first: Linear and LayerNorm layers on (T, B, d)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 1, enable_nested_tensor=False)).double()
        self.head = nn.Linear(8, 2).double()

    def forward(self, x):
        return self.head(self.rnn(x).mean(0))


def test_a_sequence_first_model_whose_layers_need_dim_0_is_refused_naming_the_layout(tmp_path):
    """Linear layers on (T, B, d) with T != B: only the whole-model vmap over dim 0 of the module's inputs could
    measure them. Before, the error spoke of graphs and EmbeddingBags; now it names the sequence-first batch and
    what to do (batch-first inputs, batch_first=True layers)."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[NoiseScaleCallback()])
    with pytest.raises(ValueError, match=r"This batch is sequence-first.*batch_first=True"):
        trainer.fit(SequenceFirstTransformer(), _sequence_first_loader([3]))
