"""The noise scale of a PyTorch Lightning run, measured from the forward and backward passes Lightning runs.

One added line in an existing script::

    from noisescale.integrations.lightning import NoiseScaleCallback
    callback = NoiseScaleCallback()                  # options: NoiseScaleCallback(NoiseScaleOptions(...))
    trainer = pl.Trainer(..., callbacks=[callback])  # logs noise_scale/b_simple, _low, _high, grad_sqnorm, trace_sigma
    trainer.fit(module, loader)
    callback.monitor.history        # one row per optimizer step (pandas DataFrame); its global_step is Lightning's
                                    # (its loggers' step, from 0), its step counts from 0; callback.monitor.summary()

Why a ``Callback``: Lightning's hooks bracket every micro-batch of automatic optimization exactly where the ghost
hooks need it -- ``on_train_batch_start`` (the batch, before the forward: arm the hooks), ``on_before_backward``
(the loss Lightning backpropagates, already divided by ``accumulate_grad_batches``), ``on_after_backward`` (read
the norms) and ``on_before_optimizer_step`` (p.grad accumulated, all-reduced under DDP and unscaled under 16-mixed,
before clipping: read |gbar|^2). The user's ``training_step``, Lightning's closure, ``no_sync`` and the optimizer
step run unchanged, so training is bit-identical to the run without the callback (an optimizer that runs the
closure several times a step, LBFGS, is measured at its first run: the later ones are left alone). The
per-example gradients of the optimizer step's whole batch follow from that loss as
:mod:`noisescale.integrations.observer` explains; the averages go to every logger through ``pl_module.log_dict``
(``on_step=True``, written every ``log_every_n_steps``; also in ``trainer.callback_metrics``).

A dict batch that packs its sequences into rows without padding (``position_ids`` restarting inside a row, no
``attention_mask``: transformers' ``DataCollatorWithFlattening`` as the DataLoader's ``collate_fn``) is measured as
under the HF Trainer, its sequences counted, from its micro-batches' gradients
(:func:`~noisescale.integrations.observer.packed_sequences`), which needs ``accumulate_grad_batches`` >= 2 or DDP.

A step whose loss or gradient is not finite because its batch holds NaN (or Inf in its targets) is named as bad
data, not divergence, in the warning, the history's ``nonfinite_data`` and the summary: the callback keeps a
reference to each micro-batch until the optimizer step and reads it only on such a step (a batch of two as
``(inputs, targets)``, any other as inputs; under the ddp strategy each rank its share, the counts then exchanged).
Lightning still takes that step's optimizer step
(unless 16-mixed's gradient scaler skips it), so the later steps go non-finite too, and the summary blames the
batch.

The training step's loss must be a mean (or any fixed-weight sum) of per-example terms over dim 0 of the batch;
the batch is a tensor, a tuple or list (``[x, y]``) or a dict of tensors with the batch in dim 0, or a
sequence-first batch (inputs (T, B, ...), targets (B, ...)): ``NoiseScaleCallback``'s ``batch_first``. Under the ddp
strategy each rank's norms are all-gathered once per step (the estimate of the global batch on every rank). The
averages and history are saved in Lightning checkpoints and continue when a fit resumes from one. B_noise
(``hessian_every``) needs ``NoiseScaleOptions(per_example_loss=...)`` and batches ``(inputs, targets)``; it calls
``pl_module(inputs)``. FSDP2 through ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``,
``tensor_parallel_size=1``) is measured like the ddp strategy (tested on 2 gloo ranks: the unsharded loop's
estimate, training bit-identical); tensor parallelism is refused. Activation checkpointing in the module's forward
(torch.utils.checkpoint, reentrant or not) is measured as without it (tested, B_noise included). Not supported:
manual optimization, several optimizers, the FSDPStrategy (FSDP1) and DeepSpeed strategies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning import Callback
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

from noisescale.integrations.observer import (
    NoiseScaleOptions,
    ObservingNoiseScaleMonitor,
    batch_size_of_framework_batch,
    packed_sequences,
)
from noisescale.batches import tensors_of
from noisescale.monitor import adapts_per_coordinate
from noisescale.sampler import population_drawn_from

__all__ = ["NoiseScaleCallback", "NoiseScaleOptions"]


class NoiseScaleCallback(Callback):
    """Measures the gradient noise scale of ``Trainer.fit`` (module docstring); ``options``: a
    :class:`~noisescale.integrations.observer.NoiseScaleOptions` (defaults if None). ``self.monitor`` holds the
    history, ``summary()`` and ``state_dict()`` once training has started.

    ``batch_first``: where the batch's inputs (the first of a batch ``(inputs, targets)``, else the whole batch)
    hold the examples. None (the default): in dim 0, as every tensor of the batch; or in dim 1 where the targets
    show it, inputs (T, B, ...) with targets (B, ...) and T != B, a sequence-first batch as torch's nn.RNN, nn.LSTM,
    nn.GRU and nn.Transformer take by default; from then on the fit's batches are taken as sequence-first. Where
    the inputs hold the batch's size in dim 1 as well as in dim 0 (T == B) and no earlier batch of the fit showed
    the layout, nothing tells the two apart: taken as dim 0, warned once. True: dim 0 always (no warning). False:
    dim 1 of every input tensor (the targets may take any shape). The layers see a sequence-first batch as they
    take it; a step with a sequence as long as the batch (an input tensor's dim 0 of the batch's size) is left
    unmeasured, warned once, since the hooks would read its positions as examples."""

    def __init__(self, options: NoiseScaleOptions | None = None, *, batch_first: bool | None = None) -> None:
        if options is not None and not isinstance(options, NoiseScaleOptions):
            raise TypeError(f"options must be a NoiseScaleOptions, got {type(options).__name__}")
        if batch_first is not None and not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be None, True or False, got {batch_first!r}")
        self.batch_first = batch_first
        self._sequence_first = batch_first is False   # the fit's batches are known to be sequence-first
        self._sequence_first_layers: list[str] = []   # the module's layers taking (T, B, ...): set at fit start
        self.options = options or NoiseScaleOptions()
        self.monitor: ObservingNoiseScaleMonitor | None = None
        self._loss: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("NoiseScaleCallback supports automatic optimization only (the loss Lightning "
                             "backpropagates is what it reads); this module sets automatic_optimization=False")
        if isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise ValueError(f"NoiseScaleCallback cannot measure under {type(trainer.strategy).__name__}; use "
                             "strategy='ddp', a single device, or FSDP2 through ModelParallelStrategy (fully_shard "
                             "in configure_model, tensor_parallel_size=1)")
        self._sequence_first_layers = _sequence_first_layers(pl_module)
        previous = self.monitor.state_dict() if self.monitor is not None else self._restored
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        self.monitor = ObservingNoiseScaleMonitor(pl_module, self.options,
                                                  process_group=dist.group.WORLD if distributed else None)
        if previous is not None:  # a second fit, or a fit resumed from a checkpoint: the averages continue
            if self.options.population_size == "auto":   # until the DataLoader is read (on_train_epoch_start)
                self.monitor.population_size = previous.get("population_size")
            self.monitor.load_state_dict(previous)
        self._restored = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """``population_size="auto"``: N from the training DataLoader, as Lightning has just set it up (again, where
        it reloads its DataLoaders: a changed N is taken with a warning)."""
        if self.options.population_size == "auto":
            self.monitor.set_population_size(population_drawn_from(trainer.train_dataloader))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pair = isinstance(batch, (tuple, list)) and len(batch) == 2
        if self.options.hessian_every and not pair:
            raise ValueError("hessian_every > 0 (B_noise) needs batches (inputs, targets); set hessian_every=0")
        batch_size, sequence_first = self._examples_of(batch, pair)
        measurable = True
        if sequence_first:
            if self.options.hessian_every:
                raise ValueError("hessian_every > 0 (B_noise) runs the module on the batch's examples taken from dim "
                                 "0 of its inputs, and this batch is sequence-first (the examples in dim 1: "
                                 f"{_shapes(batch)}); set hessian_every=0, or give the module batch-first inputs")
            inputs = batch[0] if pair else batch
            if any(t.dim() > 0 and t.shape[0] == batch_size for t in tensors_of(inputs)):
                measurable = False
                self.monitor._warn_once(
                    "sequence_as_long", f"step {self.monitor.step}: its sequence-first batch ({_shapes(batch)}) has "
                    f"a sequence as long as the batch ({batch_size}), and the layers' hooks cannot tell its positions "
                    "from its examples, so the step is not measured (warned once; the norms along dim 0 would be those "
                    "of its positions); a batch size other than the sequence length avoids it")
        sequences = packed_sequences(batch)   # a keyword batch packing its sequences into rows, padding-free
        self.monitor.begin_micro_batch(sequences or batch_size, batch=tuple(batch) if pair else (batch, None),
                                       measurable=measurable, packed=sequences is not None)

    def _examples_of(self, batch: Any, pair: bool) -> tuple[int, bool]:
        """(B, whether the batch is sequence-first): ``batch_first`` of the class docstring. Where nothing tells
        and the module holds a layer that takes sequence-first inputs (``_sequence_first_layers``), a warning: for
        inputs with B in dim 1 as well as dim 0 (T == B), or targets of 2 dims or more, (T, B) as a sequence-first
        per-step loss takes them, which agree with the inputs in dim 0."""
        inputs = batch[0] if pair else batch
        if self.batch_first is False:
            tensors = tensors_of(inputs)
            sizes = {t.shape[1] for t in tensors if t.dim() >= 2}
            if not tensors or len(sizes) != 1 or any(t.dim() < 2 for t in tensors) or 0 in sizes:
                raise ValueError("NoiseScaleCallback(batch_first=False) takes the examples from dim 1 of every input "
                                 f"tensor (sequence-first, (T, B, ...)); this batch's do not agree on one: "
                                 f"{_shapes(batch)}")
            return sizes.pop(), True
        try:
            batch_size = batch_size_of_framework_batch(batch)
        except ValueError as error:
            sequence = _sequence_first_size(*batch) if self.batch_first is None and pair else None
            if sequence is None:
                raise ValueError(f"{error}. A sequence-first batch, inputs (T, B, ...) with the examples in dim 1, "
                                 "is measured with NoiseScaleCallback(batch_first=False), or found from targets "
                                 "(B, ...) in a batch (inputs, targets)") from error
            self._sequence_first = True
            return sequence, True
        if self.batch_first is None:
            if self._sequence_first:   # the fit's earlier batches showed they are sequence-first: this one's T == B
                return batch_size, True
            if not self._sequence_first_layers:
                return batch_size, False
            if any(t.dim() >= 2 and t.shape[1] == batch_size for t in tensors_of(inputs)):
                self.monitor._warn_once(
                    "ambiguous", f"the batch's inputs hold its size ({batch_size}) in dim 1 as well as in dim 0 "
                    f"({_shapes(batch)}): the examples are taken from dim 0. If the batch is sequence-first, "
                    "(T, B, ...) with T == B (torch's nn.RNN, nn.LSTM, nn.GRU and nn.Transformer take that layout by "
                    "default), the norms and the noise scale are those of its positions and wrong: give "
                    "NoiseScaleCallback(batch_first=False), which leaves such steps unmeasured, and a batch size other "
                    "than the sequence length; batch_first=True says dim 0 and silences this warning (warned once)")
            elif pair and tensors_of(batch[1]) and all(t.dim() >= 2 for t in tensors_of(batch[1])):
                self.monitor._warn_once(
                    "sequence_targets", f"the module's layers {self._sequence_first_layers[:3]} take sequence-first "
                    "inputs by default, and this batch's targets have 2 dims or more "
                    f"({_shapes(batch)}): its examples are taken from dim 0 ({batch_size}). If the batch is "
                    "sequence-first, inputs (T, B, ...) with per-step targets (T, B), the norms and the noise scale "
                    "are those of its positions and wrong: give NoiseScaleCallback(batch_first=False); "
                    "batch_first=True says dim 0 and silences this warning (warned once)")
        return batch_size, False

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self._loss = loss.detach()
        self.monitor.check_loss(loss)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if not self.monitor.micro_batch_open:   # the optimizer ran the closure again after the step's row (LBFGS)
            return
        try:
            self.monitor.end_micro_batch(self._loss)
        except ValueError as error:
            if not self._sequence_first:
                raise
            raise ValueError(f"{error}. This batch is sequence-first (the examples in dim 1 of its inputs): layers "
                             "whose rules need the examples in dim 0 (Linear, LayerNorm and attention on (T, B, d)) "
                             "are measured only by the whole-model vmap over dim 0 of the module's inputs, which a "
                             "sequence-first batch does not fit; give the module batch-first inputs (B, T, ...) and "
                             "its layers batch_first=True (nn.TransformerEncoderLayer(..., batch_first=True)), or "
                             "leave it unmeasured (remove the callback)") from error

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.monitor.adaptive_optimizer = adapts_per_coordinate(optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: p.grad is already unscaled here
        contribution_scale = 1.0 if scaler is None else float(scaler.get_scale())
        # an epoch's last window may hold k < K micro-batches, each loss still divided by K
        loss_weight = max(self.monitor.micro_batches, 1) / trainer.accumulate_grad_batches
        # the row's global_step: Lightning's number of this step (from 0, its loggers' step; a resumed fit's goes on
        # from the checkpoint's), as the HF Trainer's row has the Trainer's
        if self.monitor.end_step(contribution_scale=contribution_scale, loss_weight=loss_weight,
                                 global_step=trainer.global_step) is not None:
            metrics = self.monitor.logged_metrics()
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()  # fit() stopped by an exception (Lightning calls no teardown hook then)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        """The hooks go, and a micro-batch left open is disarmed; the averages and history stay, and a later fit
        continues them."""
        if self.monitor is not None:
            self.monitor.close()

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the monitor's averages and history."""
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("monitor")
        if self.monitor is not None and self._restored is not None:
            self.monitor.load_state_dict(self._restored)


def _shapes(batch: Any) -> str:
    return "shapes " + ", ".join(str(tuple(t.shape)) for t in tensors_of(batch))


def _sequence_first_layers(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s layers that take sequence-first inputs, (T, B, ...): torch's RNNs and attention
    (inside nn.Transformer and its layers too) built without ``batch_first=True``. A batch-first model whose inputs
    hold B in dim 1 by chance (B features) is not warned about."""
    return [name for name, layer in module.named_modules()
            if isinstance(layer, (torch.nn.RNNBase, torch.nn.MultiheadAttention)) and not layer.batch_first]


def _sequence_first_size(inputs: Any, targets: Any) -> int | None:
    """B where a batch (inputs, targets) is sequence-first: every target tensor holds B in dim 0 and every input
    tensor B in dim 1 (the caller found dim 0 not shared); None otherwise."""
    target_sizes = {t.shape[0] if t.dim() else 0 for t in tensors_of(targets)}
    input_tensors = tensors_of(inputs)
    if len(target_sizes) != 1 or 0 in target_sizes or not input_tensors:
        return None
    size = target_sizes.pop()
    return size if all(t.dim() >= 2 and t.shape[1] == size for t in input_tensors) else None
