"""NoiseScaleTrainer: the real transformers.Trainer, tiny models, CPU, a few steps, nothing downloaded.

References: the same run with the plain Trainer (bit-identical parameters), and the per-example norms of the
optimizer step's whole batch computed one example at a time (autograd) at the step's weights.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from _bad_data import assert_named_as_bad_data  # noqa: E402
from _left_behind import compiles, hooks_on  # noqa: E402
from _packed import assert_packs_estimate  # noqa: E402
from _ranks import check_global_batch_history, framework_rank, full_state, spawn_and_load  # noqa: E402
from noisescale.estimators import (ExponentialMovingNoiseScale, ExponentialMovingRatio,  # noqa: E402
                                   simple_noise_scale)
from noisescale.hessian import hessian_noise_scale  # noqa: E402
from noisescale.integrations.huggingface import NoiseScaleTrainer  # noqa: E402
from noisescale.integrations.observer import NoiseScaleOptions  # noqa: E402
from noisescale.losses import sequence_cross_entropy  # noqa: E402

VOCAB, LENGTH = 32, 8
RTOL = 1e-6  # float64 models, but HuggingFace's causal-LM loss upcasts the logits to float32


def tiny_gpt2(dropout=0.0):
    """GPT2LMHeadModel from a config: Conv1D layers, tied embedding and head, position embeddings on (1, T) ids;
    given labels it trains on HuggingFace's token mean over the whole accumulated batch (num_items_in_batch).
    Eager attention: the Hessian proxies' forward-mode AD has no rule for the CPU flash kernel of SDPA."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).double()


def tiny_bert(dropout=0.0):
    """BertForSequenceClassification from a config (token type and position embeddings, pooler, classifier)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                     attn_implementation="eager")
    return transformers.BertForSequenceClassification(config).double()


class TinyClassifier(nn.Module):
    """forward without **kwargs: the Trainer divides each micro-batch's mean loss by the accumulation steps."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}


def _token_dataset(n=24):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    labels = ids.clone()
    for i in range(n):  # prompt tokens left out (-100) in different numbers: examples weigh differently
        labels[i, :i % 4] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _sentence_dataset(n=24):
    generator = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (n, LENGTH), generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return [{"input_ids": ids[i], "labels": y[i]} for i in range(n)]


def _class_dataset(n=24):
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(tmp_path, accumulation):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=3, learning_rate=0.1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=3, disable_tqdm=True, dataloader_num_workers=0)


class RecordingTrainer(NoiseScaleTrainer):
    """Test-only: keeps each micro-batch and the weights at the start of each optimizer step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        steps = self.__dict__.setdefault("recorded", [])
        if not steps or steps[-1]["closed"]:
            steps.append({"weights": self._weights(), "batches": [], "closed": False})
        steps[-1]["batches"].append({key: value.clone() for key, value in inputs.items()})
        loss = super().training_step(model, inputs, num_items_in_batch)
        steps[-1]["closed"] = self.accelerator.sync_gradients
        return loss

    def _weights(self) -> dict:
        return copy.deepcopy(self.model.state_dict())


def _class_loss(outputs, labels):
    return F.cross_entropy(outputs["logits"], labels, reduction="none")


def _bert_loss(accumulation):
    """BERT's forward takes **kwargs, so the Trainer passes num_items_in_batch and does not divide the loss by the
    accumulation steps, but BERT's loss ignores it and stays the micro-batch mean: the gradient the optimizer gets
    is the sum of the micro-batches' mean gradients, ``accumulation`` times their mean (transformers 5.24)."""
    return lambda outputs, labels: accumulation * _class_loss(outputs, labels)


def _gpt2_loss(accumulation):
    """The token-weighted per-example loss (mean: the token mean over the shifted labels), times N_shifted / N:
    for GPT2LMHeadModel (loss_type None) transformers 5.24's Trainer counts num_items_in_batch N over the unshifted
    labels, so the loss it trains on is sum_{i,t} c_it / N."""
    def loss(outputs, labels):
        shifted, unshifted = labels[:, 1:].ne(-100).sum(), labels.ne(-100).sum()
        return sequence_cross_entropy(outputs, labels, shift=True, weighting="token") * (shifted / unshifted)
    return loss


CASES = {  # model, data, accumulation steps -> the per-example loss whose mean the optimizer step descends
    "gpt2": (tiny_gpt2, _token_dataset, _gpt2_loss),
    "bert": (tiny_bert, _sentence_dataset, _bert_loss),
    "no-kwargs-classifier": (TinyClassifier, _class_dataset, lambda accumulation: _class_loss),
}


class _Positional(nn.Module):
    """The model called with keyword inputs given positionally, for hessian_noise_scale (the test's own adapter)."""

    def __init__(self, model, keys):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors):
        return self.model(**dict(zip(self.keys, tensors)))


# B_noise's per-example loss: the Hessian proxies vmap it over single examples, where the "token" weighting's
# batch-wide token count cannot be taken (it calls int() on a tensor), so GPT-2's is each example's mean token loss
HESSIAN_LOSS = {"gpt2": lambda outputs, labels: sequence_cross_entropy(outputs, labels, shift=True),
                "bert": _class_loss, "no-kwargs-classifier": _class_loss}


def _naive_norms(model, per_example_loss, inputs, targets):
    """|g_i|^2 one example at a time and |mean_i g_i|^2, from the per-example losses of the whole batch."""
    losses = per_example_loss(model(**inputs), targets)
    parameters = list(model.parameters())
    grads = [torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()   # unused: XLNet's mask_emb
                        for p, g in zip(parameters, torch.autograd.grad(loss, parameters, retain_graph=True,
                                                                        allow_unused=True))])
             for loss in losses]
    grads = torch.stack(grads)
    return grads.square().sum(1), grads.mean(0).square().sum()


def _estimate(model, per_example_loss, inputs, targets, population=24):
    """The per-example loop's estimate of a batch drawn without replacement from ``population`` examples: the
    Trainer's shuffled epochs over the test's datasets of 24, whose size ``population_size="auto"`` reads from the
    Trainer's DataLoader."""
    return simple_noise_scale(*_naive_norms(model, per_example_loss, inputs, targets), population=population)


def _train(trainer_class, make_model, data, path, accumulation, dropout=0.0, **kwargs):
    trainer = trainer_class(model=make_model(dropout), args=_args(path, accumulation), train_dataset=data, **kwargs)
    trainer.train()
    return trainer


def _assert_same_parameters(plain, measured):
    for (name, p), q in zip(plain.model.named_parameters(), measured.model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("case", ["gpt2", "bert"])
def test_training_with_dropout_and_accumulation_is_bit_identical(tmp_path, case):
    make_model, make_data, _ = CASES[case]
    data = make_data()
    plain = _train(transformers.Trainer, make_model, data, tmp_path / "plain", 2, dropout=0.3)
    options = NoiseScaleOptions(measure_every=2, hessian_every=3, per_example_loss=HESSIAN_LOSS[case])
    measured = _train(NoiseScaleTrainer, make_model, data, tmp_path / "measured", 2, dropout=0.3, noise_scale=options)
    _assert_same_parameters(plain, measured)
    history = measured.noise_scale.history
    assert history["measured"].tolist() == [True, False, True]
    assert history["trace_h"].notna().tolist() == [True, False, False]  # B_noise on a forked random stream
    assert history["batch_size"].tolist() == [8, 8, 8]


@pytest.mark.parametrize(("case", "accumulation"), [("gpt2", 1), ("gpt2", 2), ("bert", 2),
                                                    ("no-kwargs-classifier", 2)])
def test_training_is_bit_identical_and_the_logged_noise_scale_is_that_of_each_optimizer_steps_batch(
        tmp_path, case, accumulation):
    make_model, make_data, reference_loss = CASES[case]
    reference_loss = reference_loss(accumulation)
    data = make_data()
    options = NoiseScaleOptions(ema_decay=0.5, hessian_every=1, per_example_loss=HESSIAN_LOSS[case])
    plain = _train(transformers.Trainer, make_model, data, tmp_path / "plain", accumulation)
    measured = _train(RecordingTrainer, make_model, data, tmp_path / "measured", accumulation, noise_scale=options)
    _assert_same_parameters(plain, measured)

    # reference: the per-example estimate of each optimizer step's whole batch at the step's weights
    average, reference_rows = ExponentialMovingNoiseScale(options.ema_decay), []
    curvature_average, curvature = ExponentialMovingRatio(options.hessian_ema_decay), []
    for k, step in enumerate(measured.recorded):
        model = make_model()
        model.load_state_dict(step["weights"])
        batch = {key: torch.cat([b[key] for b in step["batches"]]) for key in step["batches"][0]}
        targets = batch.pop("labels")
        sqnorms, grad_sqnorm = _naive_norms(model, reference_loss, batch, targets)
        estimate = simple_noise_scale(sqnorms, grad_sqnorm, population=len(data))
        average.update_estimate(estimate)
        # B_noise: the Hessian proxies of the step's whole batch (its equal micro-batches are its halves), probes
        # seeded k, with the same finite-population correction
        proxies = hessian_noise_scale(_Positional(model, list(batch)), HESSIAN_LOSS[case], tuple(batch.values()),
                                      targets, generator=torch.Generator().manual_seed(k), population=len(data))
        curvature_average.update(proxies.trace_h_sigma, proxies.g_h_g)
        curvature.append((proxies, curvature_average.ratio))
        reference_rows.append((estimate, average.b_simple, average.grad_sqnorm, average.trace_sigma,
                               average.interval(options.confidence)))
    history = measured.noise_scale.history
    assert measured.noise_scale.adaptive_optimizer is True   # the Trainer's AdamW: B_simple is suggested
    assert list(history["batch_size"]) == [4 * accumulation] * 3
    assert list(history["micro_batches"]) == [accumulation] * 3
    logs = [entry for entry in measured.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert list(history["global_step"]) == [log["step"] for log in logs] == [1, 2, 3]   # joins the Trainer's logs
    for row, log, reference in zip(history.itertuples(), logs, reference_rows):
        estimate, b_simple, grad_sqnorm, trace_sigma, interval = reference
        assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=RTOL)
        assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=RTOL)
        assert log["noise_scale/grad_sqnorm"] == pytest.approx(grad_sqnorm, rel=RTOL)
        assert log["noise_scale/trace_sigma"] == pytest.approx(trace_sigma, rel=RTOL)
        if math.isfinite(b_simple):  # unresolved (|G|^2 average <= 0): neither B_simple nor its interval is logged
            assert row.b_simple == pytest.approx(b_simple, rel=RTOL)
            assert log["noise_scale/b_simple"] == pytest.approx(b_simple, rel=RTOL)
            for key, bound in zip(("noise_scale/b_simple_low", "noise_scale/b_simple_high"), interval):
                if math.isfinite(bound):  # (nan, nan) until the averages hold 1.5 effective steps
                    assert log[key] == pytest.approx(bound, rel=RTOL)
                else:
                    assert key not in log
        else:
            assert "noise_scale/b_simple" not in log
        assert row.loss == pytest.approx(log["loss"], rel=1e-6)  # the Trainer sums its losses in float32
    for row, log, (proxies, b_noise) in zip(history.itertuples(), logs, curvature):
        assert (row.trace_h_sigma, row.g_h_g, row.trace_h) == pytest.approx(
            (proxies.trace_h_sigma, proxies.g_h_g, proxies.trace_h), rel=RTOL)
        assert log.get("noise_scale/b_noise", math.inf) == pytest.approx(b_noise, rel=RTOL)


def test_a_batch_whose_every_label_is_ignored_is_no_divergence(tmp_path):
    """The run's last batch has every label -100 (a prompt-only batch): the Trainer's token mean over the batch is
    0/0, NaN, while every gradient is 0. The summary called the run diverged and advised a lower learning rate (an
    integrations survey's find). The step is left out of the averages as before, with a warning that names the
    cause, and the summary gives the noise scale of the other steps; training is as without noisescale."""
    data = _token_dataset(8)
    for example in data[4:]:
        example["labels"] = torch.full_like(example["labels"], -100)
    trainers = []
    for trainer_class, path, extra in ((transformers.Trainer, "plain", {}),
                                       (NoiseScaleTrainer, "measured", {"noise_scale": NoiseScaleOptions()})):
        arguments = _args(tmp_path / path, 1)
        arguments.max_steps, arguments.train_sampling_strategy = 2, "sequential"
        trainer = trainer_class(model=tiny_gpt2(), args=arguments, train_dataset=data, **extra)
        if trainer_class is NoiseScaleTrainer:
            with pytest.warns(RuntimeWarning, match=r"step 1: the loss is NaN while every gradient is finite: a NaN "
                                                    r"that never reaches the gradient, as 0/0"):
                trainer.train()
        else:
            trainer.train()
        trainers.append(trainer)
    _assert_same_parameters(*trainers)
    history = trainers[1].noise_scale.history
    assert history["nonfinite"].tolist() == [False, True] and history["finite_gradient"].iloc[1] == True  # noqa: E712
    summary = trainers[1].noise_scale.summary()
    assert summary.divergence is None and summary.b_simple == history["b_simple"].iloc[0]
    assert "diverged" not in str(summary) and "1 step(s) with a non-finite loss or gradient" in str(summary)


def test_a_weight_penalty_added_in_compute_loss_is_warned_about(tmp_path):
    """A subclass's compute_loss adds an L2 penalty to the model's loss: its gradient belongs to no example, so the
    per-example norms leave it out while p.grad holds it. Before, nothing said so (a review's GPT-2 with 1e-3 |theta|^2,
    accumulation 2: |G|^2 0.3 % off the loop's g_i = B c_i + K r; with 0.5 |theta|^2 the first step stopped train()
    with 'was the loss summed instead of averaged', now left unmeasured). Now the first micro-batch warns, naming
    the parameters."""

    class Penalised(NoiseScaleTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss + 1e-3 * sum(p.square().sum() for p in model.parameters())

    args = _args(tmp_path, 2)
    args.max_steps = 1
    trainer = Penalised(model=tiny_gpt2(), args=args, train_dataset=_token_dataset(), noise_scale=NoiseScaleOptions())
    with pytest.warns(RuntimeWarning, match=r"the loss reads parameters outside the model's module calls "
                                            r"\(transformer.h.0.attn.c_attn.bias, .*weight_decay"):
        trainer.train()
    assert vars(trainer.accelerator).get("backward") is None   # the accelerator's own backward again


def tiny_t5(dropout=0.0):
    """T5ForConditionalGeneration from a config, with its default SDPA attention: the relative position tables,
    looked up once for all the examples, enter every layer's attention mask by an addition (the encoder's) or a
    ``where`` with the causal mask (the decoder's), whose gradients give each example's share (``broadcast.py``)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=dropout, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).double()


def _translation_dataset(n=24):
    generator = torch.Generator().manual_seed(1)
    ids, labels = (torch.randint(1, VOCAB, (n, size), generator=generator) for size in (LENGTH, 5))
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def test_t5_is_measured_exactly_and_trained_bit_identically(tmp_path):
    """T5's relative position tables are measured from the gradients of the operations that broadcast them over
    the examples in the Trainer's own backward, under its loss weighting (T5's token mean per micro-batch, not
    divided by the accumulation steps as its forward takes **kwargs). The norms are the per-example loop's; with
    dropout, training is bit-identical to the plain Trainer's."""
    data, accumulation = _translation_dataset(), 2
    for dropout in (0.0, 0.1):
        plain = _train(transformers.Trainer, tiny_t5, data, tmp_path / f"plain{dropout}", accumulation, dropout)
        measured = _train(RecordingTrainer, tiny_t5, data, tmp_path / f"measured{dropout}", accumulation, dropout,
                          noise_scale=NoiseScaleOptions())
        _assert_same_parameters(plain, measured)
        if dropout == 0.0:
            exact = measured

    def reference_loss(outputs, labels):   # every label token counts: the micro-batch's token mean is its mean
        return accumulation * sequence_cross_entropy(outputs, labels)

    for step, row in zip(exact.recorded, exact.noise_scale.history.itertuples()):
        model = tiny_t5()
        model.load_state_dict(step["weights"])
        batch = {key: torch.cat([b[key] for b in step["batches"]]) for key in step["batches"][0]}
        estimate = _estimate(model, reference_loss, batch, batch["labels"])
        assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=1e-9)
        assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=1e-9, abs=1e-12)


def tiny_xlnet():
    """XLNetForSequenceClassification from a config: its relative attention uses raw parameters on sequence-first
    tensors, so they need the whole-model vmap."""
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=24, dropout=0.0,
                                      num_labels=3, summary_last_dropout=0.0)
    return transformers.XLNetForSequenceClassification(config).double()


def test_the_whole_model_vmap_under_the_trainer_with_label_smoothing(tmp_path):
    """The whole-model vmap, which the Trainer's step does not run, runs after the pass on the gradients the
    Trainer's backward brought to the model's outputs. With label_smoothing_factor the Trainer takes ``labels``
    out of the batch, calls the model without them and smooths the loss itself: the vmap must run on the inputs
    of that call, not on the batch (whose labels would add a loss to the outputs). Reference: each example's
    smoothed cross-entropy."""
    args = _args(tmp_path, 1)
    args.label_smoothing_factor = 0.1
    measured = RecordingTrainer(model=tiny_xlnet(), args=args, train_dataset=_sentence_dataset(),
                                noise_scale=NoiseScaleOptions())
    measured.train()
    assert "vmap" in measured.noise_scale.backend_of.values()

    def reference_loss(outputs, labels):
        return F.cross_entropy(outputs.logits, labels, label_smoothing=0.1, reduction="none")

    for step, row in zip(measured.recorded, measured.noise_scale.history.itertuples()):
        model = tiny_xlnet()
        model.load_state_dict(step["weights"])
        batch = {key: torch.cat([b[key] for b in step["batches"]]) for key in step["batches"][0]}
        estimate = _estimate(model, reference_loss, batch, batch["labels"])
        # transformers' LabelSmoother sums its smoothing term in float32
        assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=RTOL)
        assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=RTOL)


def test_b_noise_of_an_encoder_decoder_gets_its_decoder_inputs(tmp_path):
    """The Hessian proxies call the model without ``labels``; T5 then needs the decoder inputs its forward would
    have made from them (it raised "You must specify exactly one of input_ids or inputs_embeds"). Eager attention:
    forward-mode AD has no rule for the CPU flash kernel. The step with B_noise logs it."""
    import functools
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                                   attn_implementation="eager")
    options = NoiseScaleOptions(hessian_every=1, per_example_loss=functools.partial(sequence_cross_entropy,
                                                                                    shift=False))
    trainer = NoiseScaleTrainer(model=transformers.T5ForConditionalGeneration(config).double(),
                                args=_args(tmp_path, 1), train_dataset=_translation_dataset(), noise_scale=options)
    trainer.train()
    history = trainer.noise_scale.history
    assert history["trace_h"].notna().all() and np.isfinite(history["trace_h"]).all()
    assert {name for name, backend in trainer.noise_scale.backend_of.items() if backend == "vmap"} == set()


def test_bad_options_are_rejected_before_any_step(tmp_path):
    for options, message in [(dict(hessian_every=1), "per_example_loss"), (dict(measure_every=0), "measure_every"),
                             (dict(ema_decay=1.5), "ema_decay"), (dict(confidence=1.0), "confidence")]:
        with pytest.raises(ValueError, match=message):   # when the options are made, not at the first step
            NoiseScaleOptions(**options)
    with pytest.raises(TypeError, match="noise_scale must be a NoiseScaleOptions"):
        NoiseScaleTrainer(model=tiny_gpt2(), args=_args(tmp_path, 1), train_dataset=_token_dataset(), noise_scale={})


@pytest.mark.parametrize(("options", "message"), [
    (dict(log_prefix=None), "log_prefix must be a str"),
    (dict(log_prefix=3), "log_prefix must be a str"),
    (dict(seed="x"), "seed must be an int, got str"),
    (dict(seed=1.5), "seed must be an int, got float"),
    (dict(per_example_loss="ce", hessian_every=1), "per_example_loss must be callable"),
    (dict(per_example_loss=3), "per_example_loss must be callable"),
    (dict(check_independence="no"), "check_independence must be True or False, got 'no'"),
    (dict(check_independence=2), "check_independence must be True or False"),
])
def test_options_of_the_wrong_type_are_refused_by_name_when_made(options, message):
    """A new user's find: these were taken, then failed in training after optimizer steps had run (log_prefix=None
    at the first log, seed='x' at the first Hessian step without naming seed, a per_example_loss that is no
    callable at the first step as 'loss_fn must be callable'), or were read as true (check_independence='no')."""
    with pytest.raises(TypeError, match=f"^{message}"):
        NoiseScaleOptions(**options)
    NoiseScaleOptions(log_prefix="", seed=np.int64(-1), check_independence=np.bool_(False),
                      per_example_loss=_class_loss, hessian_every=1)   # what they take
    NoiseScaleOptions(check_independence=0)   # (and 1 and 0, which a review found refused)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_is_measured_exactly_and_trains_bit_identically(tmp_path, use_reentrant):
    """The Trainer's activation checkpointing re-runs each block's forward inside the backward (the MLP runs twice
    per micro-batch): the norms are still the per-example loop's, and training equals the plain Trainer's with
    the same checkpointing, with dropout too."""
    data, accumulation = _token_dataset(), 2

    def train(trainer_class, path, dropout, **kwargs):
        args = _args(path, accumulation)
        args.activation_checkpointing, args.activation_checkpointing_kwargs = True, {"use_reentrant": use_reentrant}
        trainer = trainer_class(model=tiny_gpt2(dropout), args=args, train_dataset=data, **kwargs)
        mlp, runs = trainer.model.transformer.h[0].mlp, []
        forward = mlp.forward
        mlp.forward = lambda *args, **kwargs: runs.append(1) or forward(*args, **kwargs)
        trainer.train()
        checks = 2 * (trainer_class is RecordingTrainer)   # the first step's check of independent examples
        assert len(runs) == 2 * 3 * accumulation + checks   # re-run in every backward
        return trainer

    for dropout in (0.0, 0.2):
        plain = train(transformers.Trainer, tmp_path / f"plain{dropout}", dropout)
        measured = train(RecordingTrainer, tmp_path / f"measured{dropout}", dropout, noise_scale=NoiseScaleOptions())
        _assert_same_parameters(plain, measured)
        if dropout == 0.0:
            exact = measured
    for step, row in zip(exact.recorded, exact.noise_scale.history.itertuples()):
        _assert_the_gpt2_steps_estimate(row, step, accumulation)


def _assert_the_gpt2_steps_estimate(row, step, accumulation):
    """The row's tr(Sigma) and |G|^2 are the per-example loop's on the step's whole batch, at its starting weights."""
    model = tiny_gpt2()
    model.load_state_dict(step["weights"])
    batch = {key: torch.cat([b[key] for b in step["batches"]]) for key in step["batches"][0]}
    estimate = _estimate(model, _gpt2_loss(accumulation), batch, batch["labels"])
    assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=RTOL)
    # the float32 logits' relative error in tr(Sigma) is carried into |G|^2 = |g|^2 - S/B + S/N by its cancellation
    assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=RTOL, abs=RTOL * estimate.trace_sigma)


class BatchNormClassifier(TinyClassifier):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_a_batch_norm_model_is_measured_from_its_accumulated_micro_batches(tmp_path):
    """BatchNorm in train mode: each accumulated micro-batch of 4 is a unit (the Trainer divides its mean loss by
    the 2 accumulation steps); tr(Sigma) = (sum_k 4 |g_k|^2 - 8 |g|^2) / (2 - 1) from each micro-batch's own
    gradient, and training is bit-identical to the plain Trainer's."""
    data = _class_dataset()
    plain = _train(transformers.Trainer, BatchNormClassifier, data, tmp_path / "plain", 2)
    measured = _train(RecordingTrainer, BatchNormClassifier, data, tmp_path / "measured", 2,
                      noise_scale=NoiseScaleOptions())
    _assert_same_parameters(plain, measured)
    for step, row in zip(measured.recorded, measured.noise_scale.history.itertuples()):
        model = BatchNormClassifier()
        model.load_state_dict(step["weights"])
        gradients = [torch.cat([g.flatten() for g in torch.autograd.grad(
            _class_loss(model(batch["x"]), batch["labels"]).mean(), list(model.parameters()))])
            for batch in step["batches"]]
        batch_gradient = (gradients[0] + gradients[1]) / 2
        noise = 4 * gradients[0].square().sum() + 4 * gradients[1].square().sum() - 8 * batch_gradient.square().sum()
        assert row.micro_batches == 2
        # drawn without replacement from the 24 examples: tr(Sigma) = S (N - 1) / N, |G|^2 = |g|^2 - S / B + S / N
        assert row.trace_sigma == pytest.approx((noise * 23 / 24).item(), rel=1e-10)
        assert row.grad_sqnorm == pytest.approx((batch_gradient.square().sum() - noise / 8 + noise / 24).item(),
                                                rel=1e-10)


def test_sequences_packed_into_rows_are_measured_from_the_micro_batches_as_examples(tmp_path):
    """Padding-free packing (DataCollatorWithFlattening, TRL's padding_free): each micro-batch of 4 sequences comes
    as one row (1, T) whose position_ids restart at each sequence, and the model attends within each. Before, the
    hooks took each row for one example: batch_size 2 for the step's 8 sequences, tr(Sigma) 1.73 and B_simple 2.68
    (in packs of 4) where the per-sequence loop read 9.70 and 15.3, silently. Now the sequences are counted and
    the step is measured from its micro-batches' gradients (as a BatchNorm model's): exactly the micro-batch
    estimator of the two packs with 4 sequences each, warned once; training is bit-identical to the plain Trainer's."""
    generator = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(1, VOCAB, (3 + i % 6,), generator=generator).tolist()} for i in range(24)]
    collate = transformers.DataCollatorWithFlattening()
    plain = transformers.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "plain", 2), train_dataset=data,
                                 data_collator=collate)
    plain.train()
    measured = RecordingTrainer(model=tiny_gpt2(), args=_args(tmp_path / "measured", 2), train_dataset=data,
                                data_collator=collate, noise_scale=NoiseScaleOptions())
    with pytest.warns(RuntimeWarning, match="step 0: its micro-batch packs 4 sequences into rows"):
        measured.train()
    _assert_same_parameters(plain, measured)
    history = measured.noise_scale.history
    assert history["batch_size"].tolist() == [8, 8, 8] and history["micro_batches"].tolist() == [2, 2, 2]
    for step, row in zip(measured.recorded, history.itertuples()):
        model = tiny_gpt2()
        model.load_state_dict(step["weights"])
        model.config.use_cache = False   # as the Trainer trains it (a cache would hide the packing from its masks)
        parameters, contributions = list(model.parameters()), []
        total = sum(batch["labels"].ne(-100).sum() for batch in step["batches"])   # the Trainer's num_items_in_batch
        for batch in step["batches"]:
            assert batch["input_ids"].shape[0] == 1 and int(batch["position_ids"].eq(0).sum()) == 4
            loss = model(**batch, num_items_in_batch=total).loss
            contributions.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)]))
        assert_packs_estimate(row, contributions, [4, 4], population=24)


def test_a_compiled_model_is_measured_eagerly_and_trains_as_the_compiled_trainer(tmp_path):
    """``torch_compile=True``: accelerate wraps the model in ``torch.compile``. Before, the first measured step
    failed inside Dynamo, which traced the hooks; now the measured steps run the model eagerly (aot_eager: Dynamo
    and AOTAutograd without inductor's C++ code generation), the others compiled."""
    data, accumulation = _token_dataset(), 2

    def train(trainer_class, path, **kwargs):
        args = dataclasses.replace(_args(path, accumulation), torch_compile=True, torch_compile_backend="aot_eager")
        trainer = trainer_class(model=tiny_gpt2(), args=args, train_dataset=data, **kwargs)
        trainer.train()
        assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
        return trainer

    torch._dynamo.reset()
    plain = train(transformers.Trainer, tmp_path / "plain")
    measured = train(RecordingTrainer, tmp_path / "measured", noise_scale=NoiseScaleOptions(measure_every=2))
    _assert_same_parameters(plain, measured)
    rows = [row for row in measured.noise_scale.history.itertuples() if math.isfinite(row.trace_sigma)]
    assert len(rows) == 2
    for row in rows:
        _assert_the_gpt2_steps_estimate(row, measured.recorded[row.step], accumulation)


def test_a_run_resumed_from_a_checkpoint_continues_the_averages(tmp_path):
    args = _args(tmp_path, 1)
    args.save_strategy, args.save_steps = "steps", 3
    options = NoiseScaleOptions(ema_decay=0.5)
    first = NoiseScaleTrainer(model=tiny_gpt2(), args=args, train_dataset=_token_dataset(), noise_scale=options)
    first.train()
    args = _args(tmp_path, 1)
    args.max_steps = 5
    resumed = NoiseScaleTrainer(model=tiny_gpt2(), args=args, train_dataset=_token_dataset(), noise_scale=options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.noise_scale.step == 5
    assert resumed.noise_scale.history["step"].tolist() == [3, 4]  # the history in the JSON checkpoint is left out
    assert resumed.noise_scale.history["global_step"].tolist() == [4, 5]   # the Trainer's numbers of those steps
    average = ExponentialMovingNoiseScale(0.5)  # the averages over all five steps, not restarted at the resume
    for history in (first.noise_scale.history, resumed.noise_scale.history):
        for row in history.itertuples():
            average.update(row.trace_sigma, row.grad_sqnorm)
    assert resumed.noise_scale.summary().trace_sigma == pytest.approx(average.trace_sigma, rel=1e-12)
    assert resumed.noise_scale.summary().grad_sqnorm == pytest.approx(average.grad_sqnorm, rel=1e-12)


def test_train_removes_its_hooks_and_a_later_train_installs_them_again(tmp_path):
    """After train() the model holds none of the monitor's hooks, so torch.save(model) pickles it (before, 47 hooks
    stayed and the pickle failed on their weak references); the history and summary stay readable, and a second
    train() measures again, continuing the averages."""
    options = NoiseScaleOptions(ema_decay=0.5)
    trainer = RecordingTrainer(model=tiny_gpt2(), args=_args(tmp_path, 1), train_dataset=_token_dataset(),
                               noise_scale=options)
    trainer.train()
    assert hooks_on(trainer.model) == hooks_on(tiny_gpt2()) == {}
    buffer = io.BytesIO()
    torch.save(trainer.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), trainer.model.parameters()))
    assert math.isfinite(trainer.noise_scale.summary().trace_sigma)

    trainer.train()
    assert hooks_on(trainer.model) == {}
    history = trainer.noise_scale.history
    assert history["step"].tolist() == list(range(6))
    for row in history.itertuples():
        _assert_the_gpt2_steps_estimate(row, trainer.recorded[row.step], 1)
    average = ExponentialMovingNoiseScale(0.5)   # over both runs' six steps
    for row in history.itertuples():
        average.update(row.trace_sigma, row.grad_sqnorm)
    assert trainer.noise_scale.summary().trace_sigma == pytest.approx(average.trace_sigma, rel=1e-12)


def test_a_later_train_resumed_from_a_checkpoint_continues_the_checkpoints_averages(tmp_path):
    """The same trainer's train(resume_from_checkpoint=...) takes the checkpoint's averages, not the later ones of
    the run that wrote it (as a new trainer does)."""
    args = _args(tmp_path, 1)
    args.save_strategy, args.save_steps = "steps", 2
    trainer = NoiseScaleTrainer(model=tiny_gpt2(), args=args, train_dataset=_token_dataset(),
                                noise_scale=NoiseScaleOptions(ema_decay=0.5))
    trainer.train()
    first = trainer.noise_scale.history
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.noise_scale.step == 3
    resumed = trainer.noise_scale.history
    assert resumed["step"].tolist() == [2]   # the history in the JSON checkpoint is left out
    average = ExponentialMovingNoiseScale(0.5)   # steps 0 and 1 of the first run, step 2 of the resumed one
    for row in [*first.iloc[:2].itertuples(), *resumed.itertuples()]:
        average.update(row.trace_sigma, row.grad_sqnorm)
    assert trainer.noise_scale.summary().trace_sigma == pytest.approx(average.trace_sigma, rel=1e-12)


def test_a_run_resumed_from_a_plain_trainers_checkpoint_starts_its_averages_anew(tmp_path):
    """A new user's find: resumed from a checkpoint of a plain Trainer (no noise-scale state in it), the first save
    raised KeyError: 'NoiseScaleCheckpointState' after the resumed steps, leaving a checkpoint without
    trainer_state.json. The run now resumes with a warning, its averages started anew, training as the plain
    Trainer's resumed run, and its checkpoints carry the averages again."""
    def args(path, max_steps):
        arguments = _args(path, 1)
        arguments.save_strategy, arguments.save_steps, arguments.max_steps = "steps", 2, max_steps
        return arguments
    transformers.Trainer(model=tiny_gpt2(), args=args(tmp_path / "plain", 3), train_dataset=_token_dataset()).train()
    checkpoint = str(tmp_path / "plain" / "checkpoint-2")
    plain = transformers.Trainer(model=tiny_gpt2(), args=args(tmp_path / "plain-resumed", 5),
                                 train_dataset=_token_dataset())
    plain.train(resume_from_checkpoint=checkpoint)
    resumed = RecordingTrainer(model=tiny_gpt2(), args=args(tmp_path / "resumed", 5), train_dataset=_token_dataset(),
                               noise_scale=NoiseScaleOptions(ema_decay=0.5))
    with pytest.warns(RuntimeWarning, match="global step 2 holds no noise-scale state"):
        resumed.train(resume_from_checkpoint=checkpoint)
    _assert_same_parameters(plain, resumed)
    history = resumed.noise_scale.history
    assert history["step"].tolist() == [0, 1, 2] and history["global_step"].tolist() == [3, 4, 5]
    assert resumed.noise_scale.average.num_updates == 3   # anew: none of the plain run's steps
    for row in history.itertuples():
        _assert_the_gpt2_steps_estimate(row, resumed.recorded[row.step], 1)
    saved = transformers.TrainerState.load_from_json(str(tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json"))
    assert saved.stateful_callbacks["NoiseScaleCheckpointState"]["attributes"]["monitor_state"]["step"] == 2


def test_a_model_init_trainer_starts_each_trains_averages_anew(tmp_path):
    """With ``model_init`` every train() builds a new model (a hyperparameter search's trials): the second train()
    continued the first one's averages and step count (a review's finding). Its history is now its own, each row the
    per-example loop's estimate of its step."""
    accumulation = 2
    trainer = RecordingTrainer(model_init=lambda: tiny_gpt2(), args=_args(tmp_path, accumulation),
                               train_dataset=_token_dataset())
    trainer.train()
    first, first_model = trainer.noise_scale, trainer.model
    trainer.train()
    assert trainer.model is not first_model and first.step == 3
    history = trainer.noise_scale.history
    assert trainer.noise_scale.step == 3 and history["step"].tolist() == [0, 1, 2]
    assert trainer.noise_scale.average.num_updates == 3
    for row in history.itertuples():
        _assert_the_gpt2_steps_estimate(row, trainer.recorded[3 + row.step], accumulation)

class InterruptedTrainer(RecordingTrainer):
    """Test-only: a ctrl-c after the forward of optimizer step 1's second micro-batch, before its backward (once)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if len(self.recorded) == 2 and len(self.recorded[1]["batches"]) == 2 and not hasattr(self, "interrupted"):
            self.interrupted = True
            raise KeyboardInterrupt
        return loss


def test_an_exception_in_a_step_leaves_the_model_and_the_process_as_they_were(tmp_path):
    """A ctrl-c in the middle of a step: before, the monitor's pass stayed armed on the model with its hooks,
    the process stayed in torch.compile's force_eager stance (no compile called its backend any more), and a
    second train() counted the abandoned step's first micro-batch in its own first step."""
    accumulation = 2
    assert compiles()
    trainer = InterruptedTrainer(model=tiny_gpt2(), args=_args(tmp_path, accumulation), train_dataset=_token_dataset())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert compiles()
    assert hooks_on(trainer.model) == {}
    assert trainer.noise_scale.step == 1   # step 0; step 1 was abandoned
    trainer.recorded.pop()

    trainer.train()   # again, from step 0 of the Trainer
    history = trainer.noise_scale.history
    assert history["step"].tolist() == list(range(4))
    assert history["micro_batches"].tolist() == [accumulation] * 4
    for row in history.itertuples():
        _assert_the_gpt2_steps_estimate(row, trainer.recorded[row.step], accumulation)
    assert hooks_on(trainer.model) == {}


# ---------------------------------------------------------------------------------------------- DDP, 2 gloo ranks
WORLD_SIZE = 2


def _ddp_worker(rank, out_dir):
    """One rank as torchrun would start it (accelerate reads the environment): GPT-2 with accumulation 2, a run
    with the plain Trainer and one with NoiseScaleTrainer; parameters, history and batches saved for the test."""
    framework_rank(rank, WORLD_SIZE, out_dir)
    data = _token_dataset(32)
    plain = _train(transformers.Trainer, tiny_gpt2, data, os.path.join(out_dir, "plain"), 2)
    measured = _train(RecordingTrainer, tiny_gpt2, data, os.path.join(out_dir, "measured"), 2,
                      noise_scale=NoiseScaleOptions(ema_decay=0.5))
    assert measured.args.world_size == WORLD_SIZE
    # torch_compile=True: accelerate compiles the DDP model, torch.compile(DDP(model)) (aot_eager: eager kernels)
    args = dataclasses.replace(_args(os.path.join(out_dir, "compiled"), 2), torch_compile=True,
                               torch_compile_backend="aot_eager")
    compiled = RecordingTrainer(model=tiny_gpt2(), args=args, train_dataset=data,
                                noise_scale=NoiseScaleOptions(ema_decay=0.5))
    compiled.train()
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    torch.save({"plain": [p.detach().clone() for p in plain.model.parameters()],
                "measured": [p.detach().clone() for p in measured.model.parameters()],
                "history": measured.noise_scale.history, "steps": measured.recorded,
                "compiled_history": compiled.noise_scale.history,
                "logs": measured.state.log_history}, os.path.join(out_dir, f"rank{rank}.pt"))


def _check_the_global_batch_history(ranks: list[dict]) -> ExponentialMovingNoiseScale:
    """Training bit-identical on every rank, and every rank's history that of the global batches (GPT-2,
    accumulation 2, 2 ranks), against the per-example loop at each step's weights."""
    loss = _gpt2_loss(2)

    def global_norms(k):
        model = tiny_gpt2()
        model.load_state_dict(ranks[0]["steps"][k]["weights"])
        batches = [b for r in ranks for b in r["steps"][k]["batches"]]
        batch = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        targets = batch.pop("labels")
        return _naive_norms(model, loss, batch, targets)

    return check_global_batch_history(ranks, [WORLD_SIZE * 2 * 4] * 3,   # drawn from the 32 examples
                                      lambda k: simple_noise_scale(*global_norms(k), population=32), RTOL)


def test_under_ddp_every_rank_logs_the_estimate_of_the_global_batch_and_training_is_bit_identical(tmp_path, hang_deadline_s):
    ranks = spawn_and_load(_ddp_worker, WORLD_SIZE, tmp_path, hang_deadline_s)
    average = _check_the_global_batch_history(ranks)
    for rank in ranks:   # before, compiled (torch.compile(DDP(model))): each rank's own estimate, grad_sqnorm < 0
        pd.testing.assert_frame_equal(rank["compiled_history"], rank["history"], rtol=1e-12)
    logged = [entry for entry in ranks[0]["logs"] if "noise_scale/trace_sigma" in entry]
    assert logged[-1]["noise_scale/trace_sigma"] == pytest.approx(average.trace_sigma, rel=RTOL)


class _ForcedFSDP:
    """Test-only: accelerate (1.16) turns its FSDP plugin on for GPUs alone and on CPU runs DDP instead, without a
    word; this puts its FSDP state back once the Trainer has made its accelerator, so the FSDP path runs on gloo."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True


class _FSDPTrainer(_ForcedFSDP, transformers.Trainer):
    pass


class _FSDPRecordingTrainer(_ForcedFSDP, RecordingTrainer):
    def _weights(self) -> dict:
        return full_state(self.model)


def _fsdp_worker(rank, out_dir):
    """One rank of the Trainer under FSDP2 (GPT2Block and the model sharded), accumulation 2: the plain Trainer and
    NoiseScaleTrainer; whole parameters, history and batches saved for the test."""
    from noisescale.sharded import is_sharded
    framework_rank(rank, WORLD_SIZE, out_dir)
    data, results = _token_dataset(32), {}
    for name, trainer_class, options in (("plain", _FSDPTrainer, {}), (
            "measured", _FSDPRecordingTrainer, {"noise_scale": NoiseScaleOptions(ema_decay=0.5)})):
        args = dataclasses.replace(_args(os.path.join(out_dir, name), 2), fsdp="full_shard",
                                   fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})
        trainer = trainer_class(model=tiny_gpt2(), args=args, train_dataset=data, **options)
        trainer.train()
        assert is_sharded(trainer.model)
        state = full_state(trainer.model)
        results[name] = [state[key] for key in sorted(state)]
    results.update(history=trainer.noise_scale.history, steps=trainer.recorded)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_under_fsdp2_every_rank_logs_the_estimate_of_the_global_batch_and_training_is_bit_identical(
        tmp_path, hang_deadline_s):
    """The Trainer with accelerate's FSDP plugin (FSDP2) on 2 gloo ranks: as under DDP, every rank's history is the
    global batches' estimate (per-example loop on the whole model at each step's weights) and training is
    bit-identical to the plain Trainer's under FSDP. Before, NoiseScaleTrainer refused FSDP ("sharded gradients")."""
    _check_the_global_batch_history(spawn_and_load(_fsdp_worker, WORLD_SIZE, tmp_path, hang_deadline_s))


class _Streamed(torch.utils.data.IterableDataset):
    def __init__(self, examples):
        self.examples = examples

    def __iter__(self):
        return iter(self.examples)


def test_population_size_auto_is_the_trainers_dataset_size_where_its_sampler_draws_without_replacement(tmp_path):
    """The Trainer's shuffled epochs (accelerate's seedable RandomSampler) give N = len(train_dataset); None turns
    the correction off, and a streamed IterableDataset (no known N) gets none. The estimates themselves are checked
    against the finite-population loop in the tests above."""
    cases = ((NoiseScaleOptions(), _class_dataset(), 24),
             (NoiseScaleOptions(population_size=None), _class_dataset(), None),
             (NoiseScaleOptions(), _Streamed(_class_dataset()), None))
    for index, (options, data, population) in enumerate(cases):
        args = dataclasses.replace(_args(tmp_path / str(index), 1), max_steps=1)
        trainer = NoiseScaleTrainer(model=TinyClassifier(), args=args, train_dataset=data, noise_scale=options)
        trainer.train()
        assert trainer.noise_scale.population_size == population


def test_transformers_adafactor_counts_as_adaptive():
    """transformers' Adafactor has beta1, not betas (a new user's optim="adafactor" was taken for SGD; the
    accelerate wrapper around the Trainer's optimizer is looked through: test_monitor.py)."""
    from transformers.optimization import Adafactor

    from noisescale.monitor import adapts_per_coordinate

    model = torch.nn.Linear(3, 2)
    assert adapts_per_coordinate(Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False))


class OutOfMemoryOnceTrainer(RecordingTrainer):
    """Test-only: an out-of-memory error (as torch's CPU allocator words it) after the forward of optimizer step 1's
    second micro-batch, once: ``auto_find_batch_size`` then halves the batch and runs the training loop again."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if len(self.recorded) == 2 and len(self.recorded[1]["batches"]) == 2 and not hasattr(self, "failed"):
            self.failed = self.recorded[-1]["closed"] = True   # the loop run again records its own steps
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")
        return loss


def test_a_training_loop_run_again_after_an_out_of_memory_error_counts_its_own_micro_batches(tmp_path):
    """With ``auto_find_batch_size`` the Trainer runs its loop again inside the same train() after an out-of-memory
    error: the abandoned step's first micro-batch was counted in the new loop's first step. Reference: the
    per-example loop on each step's whole batch."""
    accumulation = 2
    args = dataclasses.replace(_args(tmp_path, accumulation), auto_find_batch_size=True)
    trainer = OutOfMemoryOnceTrainer(model=tiny_gpt2(), args=args, train_dataset=_token_dataset())
    trainer.train()
    abandoned = trainer.recorded.pop(1)
    smaller = trainer._train_batch_size
    assert len(abandoned["batches"]) == 2 and smaller < 4
    history = trainer.noise_scale.history
    assert history["step"].tolist() == list(range(4))   # step 0 of the first loop, then the second loop's three
    assert history["micro_batches"].tolist() == [accumulation] * 4
    assert history["batch_size"].tolist() == [4 * accumulation] + [smaller * accumulation] * 3
    for row in history.itertuples():
        _assert_the_gpt2_steps_estimate(row, trainer.recorded[row.step], accumulation)
    assert hooks_on(trainer.model) == {}


def test_a_batch_holding_nan_is_named_as_bad_data_and_a_huge_learning_rate_still_reads_diverged(tmp_path):
    """One example's floating input is NaN: the row of the step whose batch holds it (one of its two micro-batches)
    names it (nonfinite_data), and so do the warning and the summary; the steps after it, whose parameters the
    Trainer's optimizer step on its NaN gradient broke, are blamed on it. Before, the integration kept no batch
    and the run read as diverged (lower the learning rate). On finite data a huge learning rate still diverges."""
    data = _class_dataset()
    data[5]["x"][2] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _train(RecordingTrainer, TinyClassifier, data, tmp_path / "nan", 2, noise_scale=NoiseScaleOptions())
    step = next(k for k, recorded in enumerate(trainer.recorded)
                if any(batch["x"].isnan().any() for batch in recorded["batches"]))
    named = "NaN in its inputs['x'] (1 value)"
    assert_named_as_bad_data(trainer.noise_scale, caught, step, named)

    args = dataclasses.replace(_args(tmp_path / "huge", 2), learning_rate=1e6)
    diverged = NoiseScaleTrainer(model=TinyClassifier(), args=args, train_dataset=_class_dataset(),
                                 noise_scale=NoiseScaleOptions())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diverged.train()
    summary = diverged.noise_scale.summary()
    assert summary.divergence is not None and summary.bad_data is None and "diverged" in str(summary)
