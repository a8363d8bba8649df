"""The noise scale of a HuggingFace ``transformers.Trainer`` run, measured in its own training steps.

One changed line in an existing script::

    from noisescale.integrations.huggingface import NoiseScaleTrainer
    trainer = NoiseScaleTrainer(model=model, args=args, train_dataset=train_set)   # was: Trainer(...)
    trainer.train()                 # logs noise_scale/b_simple, _low, _high, grad_sqnorm, trace_sigma (, b_noise)
    trainer.noise_scale.history     # one row per optimizer step (pandas DataFrame); its global_step is the
                                    # Trainer's (log_history's "step", from 1), its step counts from 0

Options go in ``noise_scale=NoiseScaleOptions(ema_decay=..., measure_every=..., hessian_every=...)``; a project
with its own ``Trainer`` subclass (trl's ``SFTTrainer``, say) mixes in ``NoiseScaleTrainerMixin`` first:
``class MyTrainer(NoiseScaleTrainerMixin, SFTTrainer)``.

Why a ``training_step`` override and not a ``TrainerCallback``: the per-example norms come from hooks that must
be armed around each micro-batch's forward and backward and read after it, and |gbar|^2 must be read from p.grad
after the optimizer step's last backward but before gradient clipping. A callback sees neither: ``on_step_begin``
fires once per optimizer step, no hook receives the micro-batch, and ``on_pre_optimizer_step`` comes after
clipping. ``training_step(model, inputs, num_items_in_batch)`` is the documented extension point that runs once per
micro-batch; the override calls the Trainer's own ``training_step`` unchanged inside
:meth:`~noisescale.per_example.PerExampleGradNorms.observe`, so the loss (the model's own, ``compute_loss_func`` or
an overridden ``compute_loss``), its scaling for gradient accumulation or ``num_items_in_batch``, mixed precision,
``no_sync`` and DDP's all-reduce are the Trainer's, and training is bit-identical to ``Trainer``'s. How the
per-example gradients of the accumulated global batch follow from that loss, whatever its weighting, is in
:mod:`noisescale.integrations.observer`; with HuggingFace's token-mean loss they are the gradients of the "token"
per-example loss of :func:`noisescale.losses.sequence_cross_entropy`. Parameters that only the whole-model vmap
can measure (XLNet's relative attention) are measured after the micro-batch from
the gradients its backward brought to the model's outputs (:mod:`noisescale.per_example.outputs`);
``trainer.noise_scale.backend_of`` says which. The values reach every ``report_to``
(TensorBoard, W&B, ...) through the Trainer's own ``log``, merged into its training logs every ``logging_steps``.

Sequences packed into rows without padding (``DataCollatorWithFlattening``, TRL's ``padding_free``: position_ids
that restart inside a row, no attention_mask) are counted one by one, and such steps are measured from their
micro-batches' gradients (:func:`~noisescale.integrations.observer.packed_sequences`), which needs gradient
accumulation or DDP ranks.

A step whose loss or gradient is not finite because its batch holds NaN (a floating input: ``pixel_values``,
``inputs_embeds``) is named as bad data, not divergence, in the warning, the history's ``nonfinite_data`` and the
summary: the monitor keeps a reference to each micro-batch, without ``labels`` as the inputs and ``labels`` as the
targets, until the step ends, and reads it only on such a step (under DDP each rank its share, the counts then
exchanged). The Trainer still
takes that step's optimizer step (unless fp16's gradient scaler skips it), so the later steps go non-finite too,
and the summary blames the batch.

Under ``torchrun`` / ``accelerate launch`` (DDP) each rank's per-example norms are all-gathered once per step, so
every rank logs the estimate of the global batch. The averages travel in the Trainer's checkpoints
(:class:`NoiseScaleCheckpointState`), so a resumed run continues them. B_noise (``hessian_every``) runs the Hessian
proxies on the step's whole batch (its micro-batches one at a time), each micro-batch without ``labels`` as the
model's inputs and ``labels`` as the targets of ``NoiseScaleOptions(per_example_loss=...)``, e.g.
``functools.partial(sequence_cross_entropy,
shift=True)`` from :mod:`noisescale.losses` for a causal LM (its default "example" weighting: the proxies vmap the
loss over single examples); attention on an SDPA kernel without those derivatives runs on SDPA's math kernel
there (``noisescale.hessian``), so no ``attn_implementation="eager"`` is needed. Activation checkpointing
(``activation_checkpointing=True``, reentrant or not) is measured: the hooks count each block once, its forward
with grad (non-reentrant: the first call; reentrant: the re-run inside the backward, as the first runs without
grad). Under FSDP (accelerate's FSDP plugin, FSDP1 or FSDP2) the norms come
from the sharded model as under :mod:`noisescale.sharded` (tested with FSDP2 on 2 gloo ranks, accelerate's FSDP
state forced on CPU, where accelerate itself runs DDP instead). Not supported: DeepSpeed and DataParallel (each
raises a clear error at the first step).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from noisescale._wrappers import unwrapped_module
from noisescale.integrations.observer import (
    NoiseScaleOptions,
    ObservingNoiseScaleMonitor,
    batch_size_of_framework_batch,
    packed_sequences,
    split_labels,
)
from noisescale.monitor import adapts_per_coordinate

__all__ = ["NoiseScaleTrainerMixin", "NoiseScaleTrainer", "NoiseScaleOptions", "NoiseScaleCheckpointState"]


class NoiseScaleCheckpointState(TrainerCallback, ExportableState):
    """Carries the monitor's averages and counters in the Trainer's checkpoints (``stateful_callbacks`` of
    ``trainer_state.json``, the documented ``ExportableState``); ``train(resume_from_checkpoint=...)`` reads them back
    from the restored ``trainer.state``. The per-step history is left out of the JSON (it would grow by a row per
    step): after a resume it holds the resumed steps only."""

    def __init__(self) -> None:
        self.monitor: ObservingNoiseScaleMonitor | None = None

    def state(self) -> dict[str, Any]:
        saved = None if self.monitor is None else {**self.monitor.state_dict(), "history": []}
        return {"args": {}, "attributes": {"monitor_state": saved}}

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        """The training loop starts, also again inside one ``train()`` (``auto_find_batch_size`` after an
        out-of-memory error): a monitor still open from the loop before is closed, its unfinished step dropped, and
        the loop's first step opens one that continues its averages.

        A checkpoint written without noisescale (a plain ``Trainer``'s) restores a ``trainer.state`` whose
        ``stateful_callbacks`` lack this callback's entry, on which the Trainer's first save after the resume failed
        (a ``KeyError`` after the resumed optimizer steps, leaving a checkpoint without ``trainer_state.json``): the
        entry is added here, before any step, with no averages, and the resumed run starts them anew (warned)."""
        if self.monitor is not None:
            self.monitor.close()
        name = type(self).__name__
        if name not in state.stateful_callbacks:
            state.stateful_callbacks[name] = {"args": {}, "attributes": {"monitor_state": None}}
            if state.global_step > 0:
                warnings.warn(f"the checkpoint resumed at global step {state.global_step} holds no noise-scale state "
                              "(it was written without noisescale, by a plain Trainer): the noise-scale averages "
                              "start anew at this step, and the history's step counts from 0 again (its global_step "
                              "is the Trainer's)", RuntimeWarning, stacklevel=2)


class NoiseScaleTrainerMixin:
    """Measures the gradient noise scale in every training step of the ``Trainer`` it is mixed into (module
    docstring). ``noise_scale``: a :class:`~noisescale.integrations.observer.NoiseScaleOptions` (defaults if None).
    After ``train()``, ``self.noise_scale`` is the monitor (history, summary(), state_dict()), its hooks removed
    from the model; a later ``train()`` installs them again and continues its averages."""

    def __init__(self, *args: Any, noise_scale: NoiseScaleOptions | None = None, **kwargs: Any) -> None:
        if noise_scale is not None and not isinstance(noise_scale, NoiseScaleOptions):
            raise TypeError(f"noise_scale must be a NoiseScaleOptions, got {type(noise_scale).__name__}")
        super().__init__(*args, **kwargs)
        self.noise_scale_options = noise_scale or NoiseScaleOptions()
        self.noise_scale: ObservingNoiseScaleMonitor | None = None
        self.add_callback(NoiseScaleCheckpointState())

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's own ``train``; when it ends, by an exception too, the monitor's hooks are removed (an open
        micro-batch disarmed), so the model is left as it was: no armed pass, no eager stance, picklable."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.noise_scale is not None:
                self.noise_scale.close()

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's own step on one micro-batch (``num_items_in_batch`` and whatever else the installed
        transformers passes go through unchanged), observed (module docstring)."""
        monitor = self._noise_scale_monitor(model)
        sequences = packed_sequences(inputs)
        monitor.begin_micro_batch(sequences or batch_size_of_framework_batch(inputs),
                                  batch=_inputs_and_labels(model, inputs), model_inputs=inputs,
                                  packed=sequences is not None)
        with _loss_seen(self.accelerator, monitor.check_loss) if monitor.checks_loss else contextlib.nullcontext():
            loss = super().training_step(model, inputs, *args, **kwargs)
        monitor.end_micro_batch(loss)
        if self.accelerator.sync_gradients:  # the optimizer step's last micro-batch: p.grad is complete
            scaler = getattr(self.accelerator, "scaler", None)
            scale = 1.0 if scaler is None else float(scaler.get_scale())
            # the Trainer counts this step as global_step + 1 once its optimizer step is taken (its logs from 1)
            monitor.end_step(contribution_scale=scale, grad_scale=scale, global_step=self.state.global_step + 1)
        return loss

    def _noise_scale_monitor(self, model: torch.nn.Module) -> ObservingNoiseScaleMonitor:
        if self.noise_scale is None or self.noise_scale.closed:   # the first step of this train()
            if self.is_deepspeed_enabled:
                raise ValueError("noise_scale cannot be measured under DeepSpeed; use DDP or FSDP (torchrun / "
                                 "accelerate launch without a DeepSpeed config)")
            if self.args.n_gpu > 1:
                raise ValueError(f"noise_scale cannot be measured under torch.nn.DataParallel ({self.args.n_gpu} GPUs "
                                 "in one process); launch one process per GPU with torchrun or accelerate launch")
            previous, self.noise_scale = self.noise_scale, ObservingNoiseScaleMonitor(
                model, self.noise_scale_options, train_batches=self.callback_handler.train_dataloader)
            stored = self.state.stateful_callbacks.get(NoiseScaleCheckpointState.__name__)
            stored = stored[0] if isinstance(stored, list) else stored
            saved = (stored or {}).get("attributes", {}).get("monitor_state")
            if self.state.global_step > 0:   # resumed from a checkpoint: its averages, or none (a plain Trainer's)
                if saved is not None:
                    self.noise_scale.load_state_dict(saved)
            elif previous is not None and unwrapped_module(previous.model) is unwrapped_module(model):
                self.noise_scale.load_state_dict(previous.state_dict())   # a later train() of the same model
                # continues the averages; a model_init's new model (a hyperparameter search's trial) starts anew
        self.noise_scale.adaptive_optimizer = adapts_per_coordinate(self.optimizer)  # (after a resume too)
        for callback in self.callback_handler.callbacks:  # the Trainer may have replaced it when resuming
            if isinstance(callback, NoiseScaleCheckpointState):
                callback.monitor = self.noise_scale
        return self.noise_scale

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the noise-scale averages added to every training log (the one holding "loss")."""
        if self.noise_scale is not None and self.noise_scale.step and "loss" in logs:
            logs = {**logs, **self.noise_scale.logged_metrics()}
        super().log(logs, *args, **kwargs)


class NoiseScaleTrainer(NoiseScaleTrainerMixin, Trainer):
    """``transformers.Trainer`` that measures the gradient noise scale of its training (module docstring)."""


@contextlib.contextmanager
def _loss_seen(accelerator: Any, see: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """``accelerator.backward(loss)`` gives ``see`` the loss first, with its graph (the Trainer's ``training_step``
    computes the loss, a subclass's ``compute_loss`` included, and backpropagates it without returning it before):
    the monitor's check for a term outside the model (``check_loss``)."""
    own = vars(accelerator).get("backward")
    backward = accelerator.backward

    def seen(loss: torch.Tensor, **kwargs: Any) -> Any:
        see(loss)
        return backward(loss, **kwargs)

    accelerator.backward = seen
    try:
        yield
    finally:
        if own is None:
            del accelerator.backward
        else:
            accelerator.backward = own


def _inputs_and_labels(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the batch without ``labels``, the labels): the micro-batch as the monitor keeps it, for the Hessian proxies,
    which call the model without labels (an encoder-decoder, T5 or BART, then gets the decoder inputs its forward
    would have made from them), and for the names of NaN or Inf values ("in its inputs", "in its targets")."""
    model_inputs, labels = split_labels(inputs)
    module = getattr(model, "module", model)   # DistributedDataParallel
    prepare = getattr(module, "prepare_decoder_input_ids_from_labels", None)
    encoder_decoder = getattr(getattr(module, "config", None), "is_encoder_decoder", False)
    if (labels is not None and prepare is not None and encoder_decoder
            and "decoder_input_ids" not in model_inputs and "decoder_inputs_embeds" not in model_inputs):
        model_inputs = {**model_inputs, "decoder_input_ids": prepare(labels=labels)}
    return model_inputs, labels
