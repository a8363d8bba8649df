"""Per-example norms on models nobody here wrote: HuggingFace transformers (tiny configs, random init, nothing
downloaded) and torch's own attention and recurrent layers, against a per-example loop in float64."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from torch import nn

from noisescale.batches import call_model, select_examples
from noisescale.losses import per_example_cross_entropy, sequence_cross_entropy
from noisescale.per_example import RULES, LayerRule, PerExampleError, PerExampleGradNorms, per_example_sqnorms

from test_per_example import assert_grads_as_before, grads_of

# B a power of two: the mean's 1/B is exact, so parts a model computes in float32 even in a float64 model (HF's
# RMSNorm) round the same in the batch as in the per-example loop; with B = 3 they differ by ~1e-8 relative.
BATCH, LENGTH, VOCAB = 4, 6, 37


def generator(seed):
    return torch.Generator().manual_seed(seed)


def naive_by_parameter(model, loss_fn, inputs, targets):
    """name -> (B,) |dl_i/dtheta|^2: each example alone through a copy of the model, torch.autograd.grad."""
    model = copy.deepcopy(model)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    rows = {name: [] for name in parameters}
    for i in range(BATCH):
        loss = loss_fn(call_model(model, select_examples(inputs, [i])), select_examples(targets, [i])).sum()
        grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for name, g in zip(parameters, grads):
            rows[name].append(torch.zeros((), dtype=torch.float64) if g is None else g.square().sum())
    return {name: torch.stack(values) for name, values in rows.items()}


def naive_sqnorms(model, loss_fn, inputs, targets):
    """(B,) |dl_i/dtheta|^2 summed over the parameters."""
    return sum(naive_by_parameter(model, loss_fn, inputs, targets).values())


def plain_grads(model, loss_fn, inputs, targets):
    model = copy.deepcopy(model)
    loss_fn(call_model(model, inputs), targets).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- the models

def _token_loss(outputs, targets):
    """A causal LM's mean cross-entropy per example, from its logits (B, T, V)."""
    return nn.functional.cross_entropy(outputs.logits.transpose(1, 2), targets, reduction="none").mean(1)


def _tokens(seed=1):
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator(seed))


def _padding_mask():
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


def _causal_lm_loss(outputs, labels):
    return sequence_cross_entropy(outputs, labels, shift=True)


def _gpt2(with_mask):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     attn_implementation="eager")
    tokens = _tokens()
    inputs = {"input_ids": tokens, "attention_mask": _padding_mask()} if with_mask else {"input_ids": tokens}
    labels = tokens.masked_fill(_padding_mask() == 0, -100) if with_mask else tokens
    return transformers.GPT2LMHeadModel(config), _causal_lm_loss, inputs, labels


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=VOCAB, max_position_embeddings=16, num_labels=3,
                                     attn_implementation="eager")
    inputs = {"input_ids": _tokens(), "attention_mask": _padding_mask()}
    return (transformers.BertForSequenceClassification(config), per_example_cross_entropy, inputs,
            torch.randint(0, 3, (BATCH,), generator=generator(2)))


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32, vocab_size=VOCAB,
                                      max_position_embeddings=16, attn_implementation="eager")
    tokens = _tokens()
    inputs = {"input_ids": tokens, "attention_mask": _padding_mask()}
    return (transformers.LlamaForCausalLM(config), _causal_lm_loss, inputs,
            tokens.masked_fill(_padding_mask() == 0, -100))


def _vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4, num_channels=3, num_labels=3,
                                    attn_implementation="eager")
    inputs = {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=generator(1), dtype=torch.float64)}
    return (transformers.ViTForImageClassification(config), per_example_cross_entropy, inputs,
            torch.randint(0, 3, (BATCH,), generator=generator(2)))


def _bart(scale_embedding=False):
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(encoder_layers=1, decoder_layers=1, d_model=16, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     vocab_size=VOCAB, max_position_embeddings=16, attn_implementation="eager",
                                     scale_embedding=scale_embedding)
    labels = torch.randint(3, VOCAB, (BATCH, 4), generator=generator(2))
    inputs = {"input_ids": _tokens(), "attention_mask": _padding_mask(), "labels": labels}
    return transformers.BartForConditionalGeneration(config), sequence_cross_entropy, inputs, labels


class _EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens, padding_mask):
        return self.out(self.encoder(self.embed(tokens), src_key_padding_mask=padding_mask)[:, 0])


def _torch_encoder():
    inputs = (_tokens(), _padding_mask() == 0)
    return _EncoderClassifier(), per_example_cross_entropy, inputs, torch.randint(0, 3, (BATCH,),
                                                                                    generator=generator(2))


class _RecurrentClassifier(nn.Module):
    def __init__(self, cell, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(4, 5, num_layers=2, batch_first=batch_first)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        states, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.out(states.mean(1 if self.batch_first else 0))


def _recurrent(cell, batch_first):
    def make():
        x = torch.randn(BATCH, LENGTH, 4, generator=generator(1), dtype=torch.float64)
        return _RecurrentClassifier(cell, batch_first), per_example_cross_entropy, x, \
            torch.randint(0, 3, (BATCH,), generator=generator(2))
    return make


class _BidirectionalWithState(nn.Module):
    """A bidirectional two-layer RNN whose initial state is computed from the input (hx passed in)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.rnn = cell(4, 5, num_layers=2, bidirectional=True)
        self.state = nn.Linear(4, 4 * 5)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h0 = torch.tanh(self.state(x.mean(1))).view(x.shape[0], 4, 5).transpose(0, 1).contiguous()
        states, _ = self.rnn(x.transpose(0, 1), (h0, torch.zeros_like(h0)) if self.cell is nn.LSTM else h0)
        return self.out(states[-1])


def _bidirectional(cell):
    def make():
        x = torch.randn(BATCH, LENGTH, 4, generator=generator(1), dtype=torch.float64)
        return _BidirectionalWithState(cell), per_example_cross_entropy, x, \
            torch.randint(0, 3, (BATCH,), generator=generator(2))
    return make


MODELS = {
    "gpt2": lambda: _gpt2(with_mask=False),
    "gpt2_attention_mask": lambda: _gpt2(with_mask=True),
    "bert_padding_mask": _bert,
    "llama_attention_mask": _llama,
    "vit": _vit,
    "bart": _bart,
    "bart_scaled_embedding": lambda: _bart(scale_embedding=True),
    "torch_transformer_encoder": _torch_encoder,
    "lstm": _recurrent(nn.LSTM, batch_first=False),
    "lstm_batch_first": _recurrent(nn.LSTM, batch_first=True),
    "gru": _recurrent(nn.GRU, batch_first=False),
    "gru_batch_first": _recurrent(nn.GRU, batch_first=True),
    "lstm_bidirectional_with_state": _bidirectional(nn.LSTM),
    "gru_bidirectional_with_state": _bidirectional(nn.GRU),
}


def _case(name):
    torch.manual_seed(0)
    model, loss_fn, inputs, targets = MODELS[name]()
    return model.double().eval(), loss_fn, inputs, targets


# --------------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_matches_a_per_example_loop_without_the_whole_model_vmap(name):
    model, loss_fn, inputs, targets = _case(name)
    expected = naive_sqnorms(model, loss_fn, inputs, targets)
    grads = plain_grads(model, loss_fn, inputs, targets)
    result = per_example_sqnorms(model, loss_fn, inputs, targets, backend="auto")
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-9, atol=0)
    for parameter_name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[parameter_name]), f"{parameter_name}: p.grad differs from a plain backward"
    assert "vmap" not in result.backend_of.values(), result.backend_of


@pytest.mark.parametrize("name", ["gpt2", "llama_attention_mask", "bert_padding_mask"])
def test_transformers_layers_are_measured_by_rules(name):
    """GPT-2's Conv1D, Llama's RMSNorm and position tables called with (1, T) ids all go to ghost rules."""
    model, loss_fn, inputs, targets = _case(name)
    result = per_example_sqnorms(model, loss_fn, inputs, targets, backend="auto")
    assert set(result.backend_of.values()) == {"ghost"}


class _RaisingRule(LayerRule):
    def per_example_grads(self, module, x, g, names):
        raise RuntimeError("forced failure")


@pytest.mark.parametrize("prefilled", [False, True])
def test_a_failing_rule_leaves_every_grad_as_it_was(prefilled, monkeypatch):
    transformers = pytest.importorskip("transformers")
    model, loss_fn, inputs, targets = _case("gpt2")
    monkeypatch.setitem(RULES, transformers.pytorch_utils.Conv1D, _RaisingRule())
    if prefilled:
        loss_fn(call_model(model, inputs), targets).mean().backward()
    before = grads_of(model)
    with pytest.raises(PerExampleError, match=r"module 'transformer\.h\.1\.mlp\.c_proj' \(Conv1D\).*'ghost'.*"
                                              r"forced failure.*register_rule"):
        per_example_sqnorms(model, loss_fn, inputs, targets)
    assert_grads_as_before(model, before)


def test_the_monitor_runs_on_a_transformers_batch_and_reports_the_backends():
    """NoiseScaleMonitor on a HuggingFace batch (model(**batch)) leaves training as a plain step would."""
    from noisescale.monitor import NoiseScaleMonitor
    model, loss_fn, inputs, targets = _case("gpt2_attention_mask")
    plain = copy.deepcopy(model)
    with NoiseScaleMonitor(model, loss_fn) as monitor:
        for _ in range(2):
            model.zero_grad()
            monitor(inputs, targets)
    plain.zero_grad()
    loss_fn(call_model(plain, inputs), targets).mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))
    assert monitor.history["grad_sqnorm"].notna().all() and len(monitor.history) == 2
    assert set(monitor.backend_of.values()) == {"ghost"}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_norms(use_reentrant):
    """HF gradient checkpointing re-runs each layer's forward during the backward: the re-run calls count as
    further uses (their per-example gradients are summed before the norm), so the norms are those without it."""
    model, loss_fn, inputs, targets = _case("llama_attention_mask")
    expected = per_example_sqnorms(copy.deepcopy(model), loss_fn, inputs, targets).sqnorms
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()   # checkpointing runs in train mode only; the tiny config has no dropout
    grads = plain_grads(model, loss_fn, inputs, targets)
    mlp, runs = model.model.layers[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: runs.append(1) or forward(*args, **kwargs)
    result = per_example_sqnorms(model, loss_fn, inputs, targets)
    assert len(runs) == 4   # the independence check's two forwards, the real one and its re-run in the backward
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-12, atol=0)
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())


def test_scaled_word_embeddings_are_measured_by_a_rule():
    """BART's BartScaledWordEmbedding (an nn.Embedding whose forward multiplies by embed_scale) goes to the
    scaled-embedding rule and stays exact; a subclass whose forward does something else is sent to the fallback."""
    model, loss_fn, inputs, targets = _case("bart_scaled_embedding")
    assert type(model.model.shared).__name__ == "BartScaledWordEmbedding" and model.model.shared.embed_scale == 4.0
    expected = naive_sqnorms(model, loss_fn, inputs, targets)
    result = per_example_sqnorms(model, loss_fn, inputs, targets, backend="auto")
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-9, atol=0)
    assert result.backend_of["model.shared.weight"] == "ghost"


class _ShiftedEmbedding(nn.Embedding):
    """Has an embed_scale but its forward also adds 1: the scaled rule's check must reject it."""

    embed_scale = 2.0

    def forward(self, x):
        return super().forward(x) * self.embed_scale + 1.0


class _ScaledEmbedding(_ShiftedEmbedding):
    def forward(self, x):
        return super(_ShiftedEmbedding, self).forward(x) * self.embed_scale


@pytest.mark.parametrize("embedding, backend", [(_ScaledEmbedding, "ghost"), (_ShiftedEmbedding, "module")])
def test_an_embedding_subclass_is_measured_by_the_scaled_rule_only_if_it_reproduces_the_output(embedding, backend):
    torch.manual_seed(0)
    model = nn.Sequential(embedding(50, 6, padding_idx=0), nn.Flatten(), nn.Linear(24, 3)).double()
    tokens = torch.randint(0, 50, (BATCH, 4))
    tokens[0, :2] = 0
    labels = torch.randint(0, 3, (BATCH,))
    loss_fn = per_example_cross_entropy
    expected = naive_sqnorms(model, loss_fn, tokens, labels)
    result = per_example_sqnorms(model, loss_fn, tokens, labels, backend="auto")
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-9, atol=0)
    assert result.backend_of["0.weight"] == backend


def test_a_scaled_embedding_with_a_python_float_scale_is_exact_in_float64():
    """sqrt(768) is not a float32 number: the rule must use the Python float the layer multiplies by."""
    pytest.importorskip("transformers")
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding
    torch.manual_seed(0)
    model = nn.Sequential(BartScaledWordEmbedding(30, 768, padding_idx=1, embed_scale=768 ** 0.5), nn.Flatten(),
                          nn.Linear(4 * 768, 3)).double()
    tokens, labels = torch.randint(0, 30, (BATCH, 4)), torch.randint(0, 3, (BATCH,))
    expected = naive_sqnorms(model, per_example_cross_entropy, tokens, labels)
    result = per_example_sqnorms(model, per_example_cross_entropy, tokens, labels, backend="auto")
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-12, atol=0)
    assert result.backend_of["0.weight"] == "ghost"


@pytest.mark.filterwarnings("error:Mismatch dtype:UserWarning")
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_t5_relative_position_tables_are_measured_from_the_broadcasting_operations(attention):
    """T5 with a padding mask, heads as many as the examples (4): the tables looked up once for all the examples
    and added to every layer's scores (encoder) or put through ``where`` with the causal mask (decoder) are
    measured by the Embedding rule from the gradients of those operations (``broadcast.py``), not by the
    whole-model vmap; norms the per-example loop's, p.grad the plain backward's, at both calls. The check of the
    float64 T5LayerNorm's variant no longer tries torchtune's float32 F.rms_norm with its float64 weight (torch
    warned "Mismatch dtype" to the user: a new user's trial)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=BATCH,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0, attn_implementation=attention)
    model = transformers.T5ForConditionalGeneration(config).double()
    labels = torch.randint(3, VOCAB, (BATCH, 5), generator=generator(2))
    inputs = {"input_ids": _tokens(), "attention_mask": _padding_mask(), "decoder_input_ids": labels}
    expected = naive_by_parameter(model, sequence_cross_entropy, inputs, labels)
    grads = plain_grads(model, sequence_cross_entropy, inputs, labels)
    engine = PerExampleGradNorms(model, sequence_cross_entropy, by_parameter=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        result = engine(inputs, labels)
        assert {backend for name, backend in result.backend_of.items() if "relative_attention_bias" in name} == {
            "ghost"}
        assert "vmap" not in result.backend_of.values()
        for name, values in expected.items():
            torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9,
                                       atol=1e-12 * float(values.abs().max()), msg=name)
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, grads[name]), name


# ------------------------------------------------------------------ dims of the batch's size that are not examples

def _t5_as_long_as_the_batch():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0)
    tokens = torch.randint(3, VOCAB, (BATCH, BATCH), generator=generator(1))   # T == B: buckets (T, T)
    labels = torch.randint(3, VOCAB, (BATCH, BATCH), generator=generator(2))
    return (transformers.T5ForConditionalGeneration(config), sequence_cross_entropy,
            {"input_ids": tokens, "decoder_input_ids": labels}, labels)


def _xlnet_as_long_as_the_batch():
    transformers = pytest.importorskip("transformers")
    config = transformers.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=24, dropout=0.0,
                                      num_labels=3, summary_last_dropout=0.0)
    tokens = torch.randint(3, VOCAB, (BATCH, BATCH), generator=generator(1))   # sequence-first (T, B, d), T == B
    return (transformers.XLNetForSequenceClassification(config), per_example_cross_entropy, {"input_ids": tokens},
            torch.randint(0, 3, (BATCH,), generator=generator(2)))


def _deberta_with_half_the_batch_in_buckets():
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=BATCH // 2, max_relative_positions=16,
        norm_rel_ebd="layer_norm", share_att_key=True, pooler_dropout=0.0)   # LayerNorm on a (B, d) table
    return (transformers.DebertaV2ForSequenceClassification(config), per_example_cross_entropy,
            {"input_ids": _tokens(), "attention_mask": _padding_mask()},
            torch.randint(0, 3, (BATCH,), generator=generator(2)))


@pytest.mark.parametrize("make", [_t5_as_long_as_the_batch, _xlnet_as_long_as_the_batch,
                                  _deberta_with_half_the_batch_in_buckets], ids=["t5", "xlnet", "deberta_v2"])
def test_a_dim_as_large_as_the_batch_is_not_taken_for_the_examples(make):
    """T5's relative position buckets (T, T) and XLNet's sequence-first layers (T, B, d) at T == B, DeBERTa-v2's
    LayerNorm on its (2 * buckets, d) relative-embedding table at B == 2 * buckets: the probe on B - 1 examples and
    the parameter check keep positions from being read as examples (T5's buckets are measured as shared by every
    example, XLNet's layers by their rules on dim 1, DeBERTa-v2's table, its LayerNorm and the projections of it as
    shared by every example)."""
    torch.manual_seed(0)
    model, loss_fn, inputs, targets = make()
    model = model.double().eval()
    expected = naive_by_parameter(model, loss_fn, inputs, targets)
    result = per_example_sqnorms(model, loss_fn, inputs, targets, backend="auto", by_parameter=True)
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9,
                                   atol=1e-12 * float(values.abs().max()), msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_t5_tables_under_activation_checkpointing(use_reentrant):
    """T5's relative position tables under activation checkpointing. Non-reentrant: the encoder's bias, added to
    the scores, is measured from the addition's gradients (``broadcast.py``); the decoder's passes through
    ``where`` with the causal mask, a tensor saved under checkpointing's hooks that may be read only once, so it
    goes to the whole-model vmap. Reentrant: the tables are computed again inside the backward, after the
    model's call, so both go to the vmap. That vmap must run the model without its activation checkpointing:
    under torch.func a reentrant checkpoint hides the parameters (zero gradients) and a non-reentrant one raises.
    Reference: the per-example loop on the model without checkpointing."""
    torch.manual_seed(0)
    model, loss_fn, inputs, targets = _t5_as_long_as_the_batch()
    model = model.double()
    inputs = {"input_ids": inputs["input_ids"][:, :5].contiguous(), "labels": targets[:, :3].contiguous()}   # T != B
    expected = naive_by_parameter(model.eval(), loss_fn, inputs, inputs["labels"])
    model.train()   # checkpointing runs in train mode only; the tiny config has no dropout
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    result = per_example_sqnorms(model, loss_fn, inputs, inputs["labels"], by_parameter=True)
    tables = [name for name in expected if "relative_attention_bias" in name]
    assert {name.split(".")[0]: result.backend_of[name] for name in tables} == {
        "encoder": "vmap" if use_reentrant else "ghost", "decoder": "vmap"}
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9,
                                   atol=1e-12 * float(values.abs().max()), msg=name)
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")
               and m is not model)   # switched back on


def test_opt_mlp_on_flattened_rows_is_measured_by_rules_from_the_first_call():
    """OPT runs its MLP and last LayerNorm on (B * T, d) rows, a reshape of B examples' rows that the autograd
    graph shows: the rules take them as (B, T, d) from the first call (the whole-model vmap measured them on the
    first call before this session, and a probe on B - 1 examples showed the blocks on later ones)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=24,
                                    vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=16,
                                    dropout=0.0, attention_dropout=0.0, attn_implementation="eager")
    model = transformers.OPTForCausalLM(config).double().eval()
    tokens = _tokens()
    inputs, labels = {"input_ids": tokens, "attention_mask": _padding_mask()}, tokens.masked_fill(_padding_mask() == 0,
                                                                                                  -100)
    expected = naive_by_parameter(model, _causal_lm_loss, inputs, labels)
    scale = max(float(values.abs().max()) for values in expected.values())   # the key bias's norms are ~0
    engine = PerExampleGradNorms(model, _causal_lm_loss, by_parameter=True)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        result = engine(inputs, labels)
        for name, values in expected.items():
            torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-12 * scale, msg=name)
        assert "vmap" not in result.backend_of.values()


def batch_graph_sqnorms(model, loss_fn, inputs, targets, seed):
    """(B,) |dl_i/dtheta|^2 from one seeded forward of the batch and one backward of each l_i: the reference in train
    mode with dropout, whose masks a loop over single examples would draw differently."""
    model = copy.deepcopy(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = loss_fn(call_model(model, inputs), targets)
    return torch.stack([sum(g.square().sum() for g in torch.autograd.grad(losses[i], parameters, retain_graph=True,
                                                                          allow_unused=True) if g is not None)
                        for i in range(losses.shape[0])])


@pytest.mark.parametrize("name", ["opt", "swin", "multiple choice"])
def test_flattened_rows_with_dropout_in_train_mode(name):
    """Dropout before layers on rows flattened from the examples (OPT's MLP, Swin's windows, a multiple-choice
    head's B x choices rows): the probe's forward draws other masks than the real pass, so its rows never matched and
    these layers went to the whole-model vmap on every call, with that pass's own masks (13-21 % off the real step's
    on BERT's multiple-choice head). Their rows now trace back through the autograd graph (Swin's shifted windows:
    a roll) to the examples' blocks:
    no vmap (after the first call for multiple choice, whose token ids are flattened before any graph), norms as
    those of each example's loss on the real pass's graph, same masks."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=24, num_attention_heads=2,
            max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.1, attention_dropout=0.1,
            attn_implementation="eager"))
        tokens = _tokens()
        batches = [({"input_ids": tokens}, tokens)] * 2
        loss_fn = _causal_lm_loss
    elif name == "swin":
        model = transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=16, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=2, num_labels=3,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))   # every second block's windows shifted
        batches = [(torch.randn(BATCH, 3, 16, 16, dtype=torch.float64, generator=generator(step)),
                    torch.arange(BATCH) % 3) for step in range(2)]
        loss_fn = per_example_cross_entropy
    else:
        model = _one_layer_encoder("Bert", "ForMultipleChoice")
        model.config.hidden_dropout_prob = 0.1
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.1
        batches = [({"input_ids": torch.randint(3, VOCAB, (BATCH, 3, LENGTH), generator=generator(step))},
                    torch.arange(BATCH) % 3) for step in range(2)]
        loss_fn = per_example_cross_entropy
    model = model.double().train()
    engine = PerExampleGradNorms(model, loss_fn)
    for step, (inputs, labels) in enumerate(batches):
        expected = batch_graph_sqnorms(model, loss_fn, inputs, labels, seed=step)
        torch.manual_seed(step)
        result = engine(inputs, labels)
        assert ("vmap" in result.backend_of.values()) == (name == "multiple choice" and step == 0)
        if "vmap" not in result.backend_of.values():
            torch.testing.assert_close(result.sqnorms, expected, rtol=1e-9, atol=0)


def _one_layer_encoder(name, head):
    """HF ``{name}{head}`` from a one-layer float64 config without dropout, seeded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return getattr(transformers, f"{name}{head}")(config).double()


@pytest.mark.parametrize("name", ["Bert", "DebertaV2"])
def test_multiple_choice_heads_run_their_encoder_on_examples_times_choices_rows(name):
    """HF ForMultipleChoice flattens (B, C, T) ids into B C rows, while its position embeddings are looked up once
    for all, (1, T): that lookup is not expanded to B (which broke the model's forward) but shared, each example's
    share taken where it is added to the B C rows. The ids' B C rows are a reshape of the model's input, and the
    rows after them trace back to those: the rules take them as B blocks of C rows from the first call (with a new
    batch each, then another number of choices), except BERT's token types on the first call (a buffer expanded to
    the B C rows: the whole-model vmap, until a probe has shown the blocks). Norms as the loop's, p.grad as a plain
    backward's."""
    model = _one_layer_encoder(name, "ForMultipleChoice")
    engine = PerExampleGradNorms(model, per_example_cross_entropy)
    for step in range(3):
        choices = 3 if step < 2 else 2
        ids = torch.randint(3, VOCAB, (BATCH, choices, LENGTH), generator=generator(10 + step))
        mask = _padding_mask()[:, None].expand(BATCH, choices, LENGTH).contiguous()
        inputs, labels = {"input_ids": ids, "attention_mask": mask}, torch.arange(BATCH) % choices
        model.zero_grad(set_to_none=True)
        grads = plain_grads(model, per_example_cross_entropy, inputs, labels)
        result = engine(inputs, labels)
        torch.testing.assert_close(result.sqnorms, naive_sqnorms(model, per_example_cross_entropy, inputs, labels),
                                   rtol=1e-9, atol=0)
        vmap = {parameter for parameter, backend in result.backend_of.items() if backend == "vmap"}
        assert vmap == ({"bert.embeddings.token_type_embeddings.weight"} if name == "Bert" and step == 0 else set())
        for parameter_name, p in model.named_parameters():
            assert torch.equal(p.grad, grads[parameter_name]), parameter_name


@pytest.mark.parametrize("name", ["Bert", "Roberta", "DebertaV2"])
def test_masked_language_models_with_their_tied_decoder_bias(name):
    """HF masked-LM heads register the decoder's bias as their own parameter and tie the decoder's weight to the
    word embeddings: every parameter is measured by the hooks ("ghost"), exact against the loop."""
    model = _one_layer_encoder(name, "ForMaskedLM")
    tokens = _tokens()
    inputs, labels = {"input_ids": tokens, "attention_mask": _padding_mask()}, _tokens(2)

    loss_fn = _token_loss

    expected = naive_by_parameter(model, loss_fn, inputs, labels)
    result = per_example_sqnorms(model, loss_fn, inputs, labels, by_parameter=True)
    assert set(result.backend_of.values()) == {"ghost"}
    largest = max(float(values.max()) for values in expected.values())   # the key biases' are 0 in theory
    for parameter, values in expected.items():
        torch.testing.assert_close(result.by_parameter[parameter], values, rtol=1e-9, atol=1e-12 * largest,
                                   msg=parameter)


@pytest.mark.parametrize("name", ["Qwen2Moe", "Mixtral"])
def test_mixture_of_experts_language_models(name):
    """HF sparse MoE layers route the B examples' T tokens, flattened into B T rows, through a router and fused
    experts (a per-module fallback each, grouped_mm: float32 only). From the second call the probe shows the rows
    are B blocks of T and each example's re-run takes its own rows: no whole-model vmap. Norms as the loop's to
    float32's rounding; p.grad as a plain backward's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = ({"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}
             if name == "Qwen2Moe" else {"num_local_experts": 4})
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_experts_per_tok=2, **extra)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    tokens = _tokens()

    loss_fn = _token_loss

    expected = naive_by_parameter(model, loss_fn, {"input_ids": tokens}, tokens)
    grads = plain_grads(model, loss_fn, {"input_ids": tokens}, tokens)
    engine = PerExampleGradNorms(model, loss_fn, by_parameter=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        result = engine({"input_ids": tokens}, tokens)
    assert "vmap" not in result.backend_of.values()
    largest = max(float(values.max()) for values in expected.values())
    for parameter, values in expected.items():
        torch.testing.assert_close(result.by_parameter[parameter], values.float(), rtol=2e-4,
                                   atol=1e-7 * largest, msg=parameter)
    for parameter, p in model.named_parameters():
        assert torch.equal(p.grad, grads[parameter]), parameter


def _fail_generic_reruns_of_experts(monkeypatch, kind="Experts"):
    """Makes the per-module fallback's generic re-runs (vmap, a loop over examples) fail for experts layers (or
    the modules whose class name holds ``kind``)."""
    import noisescale.per_example.fallback as fallback

    for generic in ("_by_vmap", "_by_loop"):
        def refused(module, *args, original=getattr(fallback, generic)):
            if kind in type(module).__name__:
                raise AssertionError(f"{type(module).__name__} was re-run per example")
            return original(module, *args)
        monkeypatch.setattr(fallback, generic, refused)


def _small_moe(name: str, experts: int, implementation: str, biased: str) -> nn.Module:
    """HF ``{name}ForCausalLM`` in float64 from a one-layer config with ``experts`` experts (top 2) run by
    ``implementation``; the biases of the parameters whose names hold ``biased`` drawn (they start at zero)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {"Mixtral": {"num_local_experts": experts},
             "GptOss": {"num_local_experts": experts, "head_dim": 8, "layer_types": ["full_attention"]}}.get(
        name, {"num_experts": experts, "moe_intermediate_size": 16})
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_experts_per_tok=2, **extra)
    config._experts_implementation = implementation
    model = getattr(transformers, f"{name}ForCausalLM")(config).double().train()
    with torch.no_grad():
        for parameter, p in model.named_parameters():
            if biased in parameter and "bias" in parameter:
                p.normal_(0, 0.1, generator=generator(3))
    return model


def _assert_exact_by_module(result, expected, grads, model, measured):
    """The parameters ``measured`` by the per-module fallback (or the experts' path), every norm the loop's in
    float64, and p.grad a plain backward's."""
    assert {result.backend_of[parameter] for parameter in measured} == {"module"}
    largest = max(float(values.max()) for values in expected.values())
    for parameter, values in expected.items():
        torch.testing.assert_close(result.by_parameter[parameter], values, rtol=1e-9, atol=1e-12 * largest,
                                   msg=parameter)
    for parameter, p in model.named_parameters():
        assert torch.equal(p.grad, grads[parameter]), parameter


@pytest.mark.parametrize("name, implementation", [("Mixtral", "eager"), ("Mixtral", "batched_mm"),
                                                  ("Qwen3Moe", "eager"), ("Olmoe", "batched_mm"),
                                                  ("GptOss", "eager")])
def test_experts_layers_are_measured_from_one_rerun_of_the_batch(name, implementation, monkeypatch):
    """transformers' experts layers (3D gate_up_proj / up_proj and down_proj, ``use_experts_implementation``) are
    measured from one re-run of their up projection and gate on the whole batch (``experts.py``), whatever
    implementation the model runs them with; GptOss has biases, transposed weights and its own clamped gate. Before,
    each example's rows were re-run through the experts' loop: 4.9 to 5.1x a plain step for a 2-layer Mixtral at
    B = 8, T = 32, 2.3x now. The generic re-runs are made to fail for the experts: the norms must come from the new
    path, and equal the loop's in float64; p.grad is a plain backward's."""
    model = _small_moe(name, 4, implementation, "experts")
    tokens = _tokens()

    loss_fn = _token_loss

    expected = naive_by_parameter(model, loss_fn, {"input_ids": tokens}, tokens)
    grads = plain_grads(model, loss_fn, {"input_ids": tokens}, tokens)
    engine = PerExampleGradNorms(model, loss_fn, by_parameter=True)
    model.zero_grad(set_to_none=True)
    engine({"input_ids": tokens}, tokens)   # the first call: the probe finds the examples' blocks of rows
    _fail_generic_reruns_of_experts(monkeypatch)
    model.zero_grad(set_to_none=True)
    result = engine({"input_ids": tokens}, tokens)
    experts = [parameter for parameter in expected if ".experts." in parameter]
    assert len(experts) == (4 if name == "GptOss" else 2)
    _assert_exact_by_module(result, expected, grads, model, experts)


@pytest.mark.parametrize("name", ["Mixtral", "Qwen3Moe", "Olmoe", "GptOss"])
def test_routers_on_the_flattened_tokens_are_measured_from_the_real_pass(name, monkeypatch):
    """An MoE router takes the B examples' tokens flattened into B T rows and uses its weight (and GptOss's bias)
    in one F.linear. Its parameter uses are captured in the real pass on those rows and summed over each example's
    block of T (``ParameterUses`` with ``rows``); before, its call was re-run per example by vmap (about 2 ms of a
    7 ms step at B = 8 for a 2-layer Mixtral). Here the number of experts equals B, which the capture on B rows took
    for a second dim of examples. From the third call (the second captures, a re-run confirms) re-running a router
    fails: the norms must come from the capture, and equal the loop's in float64; p.grad is a plain backward's."""
    model = _small_moe(name, BATCH, "eager", "router")
    tokens = _tokens()
    expected = naive_by_parameter(model, _token_loss, {"input_ids": tokens}, tokens)
    grads = plain_grads(model, _token_loss, {"input_ids": tokens}, tokens)
    engine = PerExampleGradNorms(model, _token_loss, by_parameter=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        engine({"input_ids": tokens}, tokens)
    _fail_generic_reruns_of_experts(monkeypatch, kind="Router")
    model.zero_grad(set_to_none=True)
    result = engine({"input_ids": tokens}, tokens)
    routers = [parameter for parameter in expected if ".mlp.gate." in parameter or ".mlp.router." in parameter]
    assert len(routers) == (2 if name == "GptOss" else 1)
    _assert_exact_by_module(result, expected, grads, model, routers)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_experts_layers_under_bfloat16_autocast(implementation, monkeypatch):
    """Under CPU bfloat16 autocast, Mixtral's experts stay on their path (``experts.py``) in every implementation:
    the sum check's own products and the norms of factors are taken at full precision, and its tolerance is half
    precision's where the call ran under autocast (its outputs are float32, its products bfloat16 inside). Before,
    the check's products ran in bfloat16 and its tolerance was float32's, so ``grouped_mm`` (which computes in
    float32 whatever autocast says) and ``batched_mm`` failed it, 2e-3 to 3e-3 off, and went to the whole-model
    vmap. The norms agree with that vmap's under the same autocast to bfloat16's rounding (5e-3 in a script)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
                                        num_experts_per_tok=2, num_local_experts=3)
    config._experts_implementation = implementation
    model = transformers.MixtralForCausalLM(config).train()
    tokens = _tokens()

    def measure(backend):
        engine = PerExampleGradNorms(model, _token_loss, by_parameter=True, backend=backend)
        for _ in range(2):   # the first call probes
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                result = engine({"input_ids": tokens}, tokens)
        return result

    reference = measure("vmap")
    _fail_generic_reruns_of_experts(monkeypatch)
    result = measure("auto")
    experts = [name for name in result.backend_of if ".experts." in name]
    assert len(experts) == 2 and {result.backend_of[name] for name in experts} == {"module"}
    for name in experts:
        torch.testing.assert_close(result.by_parameter[name], reference.by_parameter[name], rtol=2e-2,
                                   atol=1e-3 * float(reference.by_parameter[name].max()), msg=name)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
@pytest.mark.parametrize("has_gate, is_transposed, has_bias", [(False, False, False), (False, True, True),
                                                               (True, True, False)])
def test_experts_layers_of_every_layout_are_measured_exactly(has_gate, is_transposed, has_bias, implementation,
                                                             monkeypatch):
    """An experts layer of one's own, decorated as transformers' (NemotronH's layout: no gate, an activation;
    Ergo's: no gate, transposed weights; Aria's: a gate, transposed), behind a router and a residual of a tiny
    model: measured by ``experts.py`` (the generic re-runs fail for it) exactly against the loop in float64, with
    p.grad a plain backward's."""
    moe = pytest.importorskip("transformers.integrations.moe")
    torch.manual_seed(0)
    experts, width, hidden = 3, 7, 5

    @moe.use_experts_implementation(has_gate=has_gate, is_transposed=is_transposed, has_bias=has_bias)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, up = experts, (2 if has_gate else 1) * hidden
            shapes = ((width, up), (hidden, width)) if is_transposed else ((up, width), (width, hidden))
            self.up_name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, self.up_name, nn.Parameter(torch.randn(experts, *shapes[0], generator=generator(4))))
            self.down_proj = nn.Parameter(torch.randn(experts, *shapes[1], generator=generator(5)) / 3)
            if has_bias:
                setattr(self, f"{self.up_name}_bias", nn.Parameter(torch.randn(experts, up, generator=generator(6))))
                self.down_proj_bias = nn.Parameter(torch.randn(experts, width, generator=generator(7)))
            self.act_fn = nn.GELU()

        def forward(self, hidden_states, top_k_index, top_k_weights):   # the eager loop, as Mixtral's
            out = torch.zeros_like(hidden_states)
            for e in range(experts):
                token, slot = torch.where(top_k_index == e)
                w_up, w_down = getattr(self, self.up_name)[e], self.down_proj[e]
                u = hidden_states[token] @ (w_up if is_transposed else w_up.T)
                if has_bias:
                    u = u + getattr(self, f"{self.up_name}_bias")[e]
                h = self._apply_gate(u) if has_gate else self.act_fn(u)
                o = h @ (w_down if is_transposed else w_down.T)
                if has_bias:
                    o = o + self.down_proj_bias[e]
                out.index_add_(0, token, o * top_k_weights[token, slot, None])
            return out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            config = types.SimpleNamespace(_experts_implementation=implementation)
            self.embed, self.router = nn.Embedding(VOCAB, width), nn.Linear(width, experts)
            self.experts, self.head = Experts(config), nn.Linear(width, 3)

        def forward(self, tokens):
            h = self.embed(tokens)
            rows = h.reshape(-1, width)
            weights, index = self.router(rows).softmax(-1).topk(2, dim=-1)
            return self.head(torch.tanh(h + self.experts(rows, index, weights).view_as(h)).mean(1))

    model = Model().double()
    tokens, classes = _tokens(), torch.randint(0, 3, (BATCH,), generator=generator(8))
    expected = naive_by_parameter(model, per_example_cross_entropy, {"tokens": tokens}, classes)
    grads = plain_grads(model, per_example_cross_entropy, {"tokens": tokens}, classes)
    engine = PerExampleGradNorms(model, per_example_cross_entropy, by_parameter=True)
    engine({"tokens": tokens}, classes)   # the first call: the probe finds the examples' blocks of rows
    _fail_generic_reruns_of_experts(monkeypatch)
    model.zero_grad(set_to_none=True)
    result = engine({"tokens": tokens}, classes)
    assert {result.backend_of[name] for name in expected if name.startswith("experts.")} == {"module"}
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


@pytest.mark.parametrize("variant", ["lora", "dora", "modules_to_save"])
def test_peft_adapters_are_measured_by_the_hooks(variant):
    """PEFT LoRA adapters on every projection of a tiny Llama (nothing downloaded), with DoRA, or with a trainable
    copy of the head: the adapters' per-example norms equal the loop's, p.grad is a plain backward's, and nothing goes
    to the whole-model vmap. DoRA's weight norm runs lora_B(lora_A(eye(d))) and detaches it; that call, on rows
    that are not the examples, sent every LoRA layer to the vmap before (a new user's timing: 5.5x a plain step,
    3.5x after), though no gradient reaches it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=projections, use_dora=variant == "dora",
                           modules_to_save=["lm_head"] if variant == "modules_to_save" else None,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).double(), lora).eval()
    with torch.no_grad():   # lora_B starts at zero, and lora_A would get no gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=generator(2))
    tokens = _tokens()

    loss_fn = _token_loss

    expected = naive_by_parameter(model, loss_fn, {"input_ids": tokens}, tokens)
    grads = plain_grads(model, loss_fn, {"input_ids": tokens}, tokens)
    result = PerExampleGradNorms(model, loss_fn, by_parameter=True)({"input_ids": tokens}, tokens)
    assert "vmap" not in result.backend_of.values() and len(result.backend_of) == len(expected)
    for parameter, values in expected.items():
        torch.testing.assert_close(result.by_parameter[parameter], values, rtol=1e-9, atol=0, msg=parameter)
    for parameter, p in model.named_parameters():
        assert (p.grad is None) if parameter not in expected else torch.equal(p.grad, grads[parameter]), parameter


@pytest.mark.parametrize("router_loss", [True, False], ids=["router_loss", "plain"])
def test_an_moe_router_loss_in_the_model_s_loss_is_warned_about_in_observe(router_loss):
    """HF Mixtral given labels with output_router_logits=True adds its router's load-balancing loss, computed over
    the whole batch's tokens, to the loss it returns (as the HF Trainer trains it; 3 experts, since 4, the batch
    size, would make observe refuse the router for another reason): observe warns, names the router
    loss and keeps it in ``coupling``, with p.grad as a plain backward's. Before, nothing was said (a new user's
    Trainer run: norms 0.1 to 0.3 % off the loop at router_aux_loss_coef=0.02, 26 % at 1). The router loss off,
    no such warning."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_experts_per_tok=2, num_local_experts=3,
        output_router_logits=router_loss, router_aux_loss_coef=0.02)
    model = transformers.MixtralForCausalLM(config)
    inputs = {"input_ids": _tokens(), "labels": _tokens()}
    plain = copy.deepcopy(model)
    plain(**inputs).loss.backward()
    engine = PerExampleGradNorms(model, lambda outputs, targets: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with engine.observe(BATCH, model_inputs=inputs):
            model(**inputs).loss.backward()
    found = [str(w.message) for w in caught if "term over the whole batch" in str(w.message)]
    assert len(found) == (1 if router_loss else 0)
    assert (engine.coupling is not None) == router_loss
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.filterwarnings("ignore:a measured layer's input has a dim:RuntimeWarning")   # the (B, B) logits
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_contrastive_model_s_own_loss_is_refused_as_coupled(family):
    """CLIP's and SigLIP's logits pair every image with every text of the batch: a loss per image row (CLIP's
    cross-entropy, SigLIP's sigmoid loss) reads every example's embedding, so dl_i/dtheta are not per-example
    gradients. Refused with p.grad as it was; a loss on each example's own pair (the diagonal) is measured exactly."""
    import transformers as tr
    text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=LENGTH)
    vision = dict(image_size=12, patch_size=4, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                  num_attention_heads=2)
    if family == "clip":
        config = tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
        model = tr.CLIPModel(config)
    else:
        config = tr.SiglipConfig(text_config=text, vision_config=vision)
        model = tr.SiglipModel(config)
    torch.manual_seed(0)
    model = model.double().eval()
    inputs = {"input_ids": _tokens(), "pixel_values": torch.randn(BATCH, 3, 12, 12, dtype=torch.float64,
                                                                   generator=generator(3))}

    def contrastive(outputs, targets):
        logits = outputs.logits_per_image
        if family == "clip":
            return nn.functional.cross_entropy(logits, torch.arange(BATCH), reduction="none")
        signs = 2 * torch.eye(BATCH, dtype=logits.dtype) - 1
        return -nn.functional.logsigmoid(signs * logits).sum(1)

    def own_pair(outputs, targets):
        return -outputs.logits_per_image.diagonal()

    before = grads_of(model)
    with pytest.raises(ValueError, match="per-example losses are coupled"):
        per_example_sqnorms(model, contrastive, inputs, None)
    assert_grads_as_before(model, before)
    expected = naive_sqnorms(model, own_pair, inputs, torch.zeros(BATCH))
    result = per_example_sqnorms(model, own_pair, inputs, None)
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-9, atol=0)
    # observe (the Trainer's path) cannot see the loss: the model's own contrastive loss is warned about, from the
    # outputs it reads (the scale and bias frozen: trainable, they need the whole-model vmap, which observe refuses)
    model.logit_scale.requires_grad_(False)
    if family == "siglip":
        model.logit_bias.requires_grad_(False)
    with pytest.warns(RuntimeWarning, match=r"couples the examples.*\['logits_per_image'\]"):
        with PerExampleGradNorms(model, own_pair).observe(BATCH, model_inputs=inputs):
            model(**inputs, return_loss=True).loss.backward()


@pytest.mark.parametrize("name", ["SwitchTransformers", "NllbMoe"])
def test_mixture_of_experts_with_an_expert_module_per_expert(name):
    """HF SwitchTransformers and NLLB-MoE send each expert's routed tokens through two Linear layers, and their
    routers convert their own classifier on every call (``self.classifier.to(self.dtype)``). The whole-model vmap
    crashed the process on that conversion (a segmentation fault); the second layer, on as many rows as the
    examples by chance, was measured by its rule (0.38 to 0.87 off for Switch, silently). Then the experts that
    received tokens went to the vmap, which takes the examples one by one. Now each expert's layers take their
    rows' examples from the index that picked them (``expert(hidden[None, top_x])``: row r is example
    top_x[r] // T's) and their rules measure them: no whole-model vmap. Exact against the loop (the router computes
    in float32)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "SwitchTransformers":
        config = transformers.SwitchTransformersConfig(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
            num_experts=4, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1)
    else:
        config = transformers.NllbMoeConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_experts=4, expert_capacity=64,
            encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=32)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).double().eval()
    tokens, labels = _tokens(), _tokens(2)[:, :5]
    inputs = {"input_ids": tokens, "decoder_input_ids": labels}
    model(**inputs)   # the routers' first conversion of their classifier to float32, before the loop's copy
    expected = naive_sqnorms(model, sequence_cross_entropy, inputs, labels)
    grads = plain_grads(model, sequence_cross_entropy, inputs, labels)
    result = per_example_sqnorms(model, sequence_cross_entropy, inputs, labels)
    torch.testing.assert_close(result.sqnorms, expected, rtol=1e-8, atol=0)
    assert "vmap" not in result.backend_of.values()
    for parameter, p in model.named_parameters():   # (experts no token reached get no gradient)
        assert (p.grad is None and grads[parameter] is None) or torch.equal(p.grad, grads[parameter]), parameter


def test_wav2vec2_time_masks_over_a_padded_batch_are_no_coupling():
    """HF Wav2Vec2 in train mode draws its SpecAugment time masks from NumPy over each example's length, so one
    example's length moves the other examples' masks: a check in train mode took that for a coupled loss (1e-3 to
    3e-3 in a review) and refused standard CTC fine-tuning. The check runs in eval mode: no error, and the
    training's NumPy stream is that of a run without the check."""
    transformers = pytest.importorskip("transformers")
    np = pytest.importorskip("numpy")
    config = transformers.Wav2Vec2Config(
        vocab_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", mask_time_prob=0.3, mask_time_length=2,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config).train()
    mask = torch.ones(BATCH, 1600, dtype=torch.long)
    mask[0, 1000:], mask[2, 1200:] = 0, 0
    inputs = {"input_values": torch.randn(BATCH, 1600, generator=generator(1)), "attention_mask": mask}

    def ctc(outputs, labels):
        log_probs = outputs.logits.log_softmax(-1).transpose(0, 1)
        frames, size = log_probs.shape[:2]   # (one example in the whole-model vmap's loop)
        return nn.functional.ctc_loss(log_probs, labels, torch.full((size,), frames, dtype=torch.long),
                                      torch.full((size,), 5, dtype=torch.long), reduction="none", zero_infinity=True)

    labels = torch.randint(1, 12, (BATCH, 5), generator=generator(2))
    draws = []
    for check in (True, False):
        np.random.seed(0)
        per_example_sqnorms(model, ctc, inputs, labels, check_independence=check)
        draws.append(np.random.rand())
    assert draws[0] == draws[1]


def test_peft_adapters_on_parameters_are_refused_before_the_model_is_touched():
    """PEFT's LoRA on parameters (``target_parameters``: an MoE's 3-D expert weights) registers a parametrization
    inside every forward; the per-example passes' re-runs (functional_call) left a new user's Mixtral without its
    ``down_proj``, so that every later forward raised, with noisescale or without. Refused at construction now,
    naming the adapters, and a plain training step runs afterwards as before."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    if "target_parameters" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this PEFT has no LoRA on parameters")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
                                        num_experts_per_tok=2, num_local_experts=3)
    lora = peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    model = peft.get_peft_model(transformers.MixtralForCausalLM(config), lora).train()
    with pytest.raises(ValueError, match=r"mlp\.experts are PEFT LoRA adapters on parameters"):
        PerExampleGradNorms(model, _token_loss)
    tokens = _tokens()
    _token_loss(model(input_ids=tokens), tokens).mean().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
