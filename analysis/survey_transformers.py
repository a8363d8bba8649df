"""Survey: per-example norms on small HuggingFace models nobody here wrote, against a loop over single examples.

For each model (random weights from a small config, dropout 0, float64, B = 4; nothing is downloaded) two calls
of ``PerExampleGradNorms(model, loss_fn, backend="auto", by_parameter=True)`` are compared, parameter by
parameter, with |dl_i/dtheta|^2 from one forward and backward per example (the second call's backends count: the
first one verifies rules and may probe or refuse captures). Reported: the largest relative difference (against a
floor of 1e-10 x the model's largest norm, since some gradients are 0 in theory, such as a key projection's bias),
and how many parameters each backend measured ("ghost" rules, "module" capture or re-run, "vmap" the whole-model
pass), naming those left to the whole-model vmap; for the first call, its largest relative difference and how many
parameters the whole-model vmap measured (what a single measurement returns and costs).

    python analysis/survey_transformers.py [--length 8] [--observe] [--models t5 opt ...] [--out FILE.csv]

``--length 4`` makes every sequence as long as the batch (T == B), where a dim of the batch's size that is not
the examples must not be taken for them. ``--observe`` measures as the framework integrations do: the survey runs
the forward and backward itself inside ``observe(B, model_inputs=inputs)``, whose parameters that need the
whole-model vmap are measured from the gradients that backward brought to the model's outputs (the backends are
then not reported).
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import transformers as tr
except ImportError as error:   # an optional dependency ("[dev]" installs it)
    raise SystemExit(f"this survey needs transformers: {error}")

from noisescale.batches import call_model, select_examples
from noisescale.checkpoints import atomic_write
from noisescale.per_example import PerExampleGradNorms

B, V, C = 4, 99, 3
IMG = 32
LENGTH = [8, 6]   # encoder (or only) sequence length, decoder length; --length sets both


def _ids(t=None, low=3, high=V):
    t = LENGTH[0] if t is None else t
    g = torch.Generator().manual_seed(1)
    return torch.randint(low, high, (B, t), generator=g)


def _pixels(ch=3, size=IMG):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, ch, size, size, generator=g, dtype=torch.float64)


def _cls_targets():
    return torch.tensor([0, 1, 2, 1])


def cls_loss(out, y):
    return F.cross_entropy(out.logits, y, reduction="none")


def lm_loss(out, y):
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape).mean(1)


def regress(key):
    def loss(out, y):
        z = getattr(out, key)
        return ((z - y) ** 2).flatten(1).sum(1)
    return loss


def _dense_target(shape):
    g = torch.Generator().manual_seed(3)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def clip_text():
    cfg = tr.CLIPTextConfig(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
                            attention_dropout=0.0, eos_token_id=2)
    m = tr.CLIPTextModelWithProjection(cfg)
    return m, {"input_ids": _ids()}, _dense_target((B, 16)), regress("text_embeds")


def clip_vision():
    cfg = tr.CLIPVisionConfig(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=16, attention_dropout=0.0)
    m = tr.CLIPVisionModelWithProjection(cfg)
    return m, {"pixel_values": _pixels()}, _dense_target((B, 16)), regress("image_embeds")


def siglip_text():
    cfg = tr.SiglipTextConfig(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16, attention_dropout=0.0)
    m = tr.SiglipTextModel(cfg)
    return m, {"input_ids": _ids()}, _dense_target((B, 32)), regress("pooler_output")


def siglip_vision():
    cfg = tr.SiglipVisionConfig(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=37,
                                num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.0)
    m = tr.SiglipVisionModel(cfg)
    return m, {"pixel_values": _pixels()}, _dense_target((B, 32)), regress("pooler_output")


def _vit_kw():
    return dict(image_size=IMG, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=C)


def deit():
    m = tr.DeiTForImageClassification(tr.DeiTConfig(**_vit_kw()))
    return m, {"pixel_values": _pixels()}, _cls_targets(), cls_loss


def swin():
    cfg = tr.SwinConfig(image_size=IMG, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=C)
    m = tr.SwinForImageClassification(cfg)
    return m, {"pixel_values": _pixels()}, _cls_targets(), cls_loss


def convnext():
    cfg = tr.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=IMG, num_labels=C, drop_path_rate=0.0)
    m = tr.ConvNextForImageClassification(cfg)
    return m, {"pixel_values": _pixels()}, _cls_targets(), cls_loss


def dinov2():
    kw = _vit_kw()
    kw.pop("intermediate_size")
    kw["mlp_ratio"] = 2
    m = tr.Dinov2ForImageClassification(tr.Dinov2Config(**kw))
    return m, {"pixel_values": _pixels()}, _cls_targets(), cls_loss


def beit():
    m = tr.BeitForImageClassification(tr.BeitConfig(**_vit_kw(), use_relative_position_bias=True,
                                                     use_absolute_position_embeddings=True, drop_path_rate=0.0))
    return m, {"pixel_values": _pixels()}, _cls_targets(), cls_loss


def vit_mae():
    cfg = tr.ViTMAEConfig(**{k: v for k, v in _vit_kw().items() if k != "num_labels"}, decoder_hidden_size=32,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=37,
                          mask_ratio=0.5)
    m = tr.ViTMAEForPreTraining(cfg)
    g = torch.Generator().manual_seed(5)
    noise = torch.rand(B, (IMG // 8) ** 2, generator=g, dtype=torch.float64)
    return m, {"pixel_values": _pixels(), "noise": noise}, _dense_target((B, 16, 8 * 8 * 3)), regress("logits")


def _seq2seq(model, dec_t=None, extra=None):
    dec_t = LENGTH[1] if dec_t is None else dec_t
    inputs = {"input_ids": _ids(), "decoder_input_ids": _ids(dec_t, 3, V)[:, torch.randperm(dec_t)]}
    inputs.update(extra or {})
    g = torch.Generator().manual_seed(4)
    return model, inputs, torch.randint(3, V, (B, dec_t), generator=g), lm_loss


def whisper():
    cfg = tr.WhisperConfig(vocab_size=V, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                           decoder_ffn_dim=37, max_source_positions=16, max_target_positions=16, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
    m = tr.WhisperForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(B, 8, 32, generator=g, dtype=torch.float64)
    model, inputs, y, loss = _seq2seq(m)
    inputs = {"input_features": feats, "decoder_input_ids": inputs["decoder_input_ids"]}
    return model, inputs, y, loss


def t5(cls=tr.T5ForConditionalGeneration, cfgcls=tr.T5Config, **extra):
    cfg = cfgcls(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                 **extra)
    m = cls(cfg)
    inputs = {"input_ids": _ids(), "decoder_input_ids": _ids(LENGTH[1])}
    g = torch.Generator().manual_seed(4)
    return m, inputs, torch.randint(3, V, (B, LENGTH[1]), generator=g), lm_loss


def mt5():
    return t5(tr.MT5ForConditionalGeneration, tr.MT5Config)


def switch_transformers():   # one module per expert; the router computes in float32 (no jitter: the loop's draws)
    return t5(tr.SwitchTransformersForConditionalGeneration, tr.SwitchTransformersConfig, num_experts=4,
              expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, router_jitter_noise=0.0)


def nllb_moe():
    cfg = tr.NllbMoeConfig(**_bart_kw(), num_experts=4, expert_capacity=64, encoder_sparse_step=1,
                           decoder_sparse_step=1, moe_token_dropout=0.0, encoder_layerdrop=0.0,
                           decoder_layerdrop=0.0)
    return _seq2seq(tr.NllbMoeForConditionalGeneration(cfg))


def _bart_kw():
    return dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2)


def pegasus():
    return _seq2seq(tr.PegasusForConditionalGeneration(tr.PegasusConfig(**_bart_kw())))


def mbart():
    return _seq2seq(tr.MBartForConditionalGeneration(tr.MBartConfig(**_bart_kw())))


def marian():
    return _seq2seq(tr.MarianMTModel(tr.MarianConfig(**_bart_kw(), decoder_vocab_size=V)))


def led():
    kw = _bart_kw()
    kw.pop("max_position_embeddings")
    cfg = tr.LEDConfig(**kw, max_encoder_position_embeddings=32, max_decoder_position_embeddings=32,
                       attention_window=[4, 4])
    return _seq2seq(tr.LEDForConditionalGeneration(cfg))


def _causal(model):
    ids = _ids()
    g = torch.Generator().manual_seed(4)
    return model, {"input_ids": ids}, torch.randint(3, V, (B, LENGTH[0]), generator=g), lm_loss


def opt():
    return _causal(tr.OPTForCausalLM(tr.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                                                  num_attention_heads=4, max_position_embeddings=32,
                                                  word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                                                  pad_token_id=1)))


def _llama_kw():
    return dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32)


def mistral():
    return _causal(tr.MistralForCausalLM(tr.MistralConfig(**_llama_kw())))


def qwen2():
    return _causal(tr.Qwen2ForCausalLM(tr.Qwen2Config(**_llama_kw())))


def phi():
    kw = _llama_kw()
    kw.pop("num_key_value_heads")
    return _causal(tr.PhiForCausalLM(tr.PhiConfig(**kw, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                                  embd_pdrop=0.0, attention_dropout=0.0)))


def gpt_neox():
    return _causal(tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=37,
                                                          rotary_pct=0.5, max_position_embeddings=32,
                                                          hidden_dropout=0.0, attention_dropout=0.0)))


def falcon():
    return _causal(tr.FalconForCausalLM(tr.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, hidden_dropout=0.0,
                                                        attention_dropout=0.0)))


def falcon_alibi():
    return _causal(tr.FalconForCausalLM(tr.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, alibi=True, hidden_dropout=0.0,
                                                        attention_dropout=0.0)))


def bloom():
    return _causal(tr.BloomForCausalLM(tr.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4,
                                                      hidden_dropout=0.0, attention_dropout=0.0)))


def gptj():
    return _causal(tr.GPTJForCausalLM(tr.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                    n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                                    attn_pdrop=0.0)))


def _bert_kw():
    return dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=40, num_labels=C)


def _cls_text(model):
    return model, {"input_ids": _ids()}, _cls_targets(), cls_loss


def distilbert():
    return _cls_text(tr.DistilBertForSequenceClassification(tr.DistilBertConfig(
        vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=C)))


def roberta():
    return _cls_text(tr.RobertaForSequenceClassification(tr.RobertaConfig(**_bert_kw(), pad_token_id=1)))


def albert():
    return _cls_text(tr.AlbertForSequenceClassification(tr.AlbertConfig(**_bert_kw(), embedding_size=16,
                                                                        classifier_dropout_prob=0.0)))


def electra():
    return _cls_text(tr.ElectraForSequenceClassification(tr.ElectraConfig(**_bert_kw(), embedding_size=16)))


def deberta_v2():
    return _cls_text(tr.DebertaV2ForSequenceClassification(tr.DebertaV2Config(
        **_bert_kw(), relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
        max_relative_positions=16, norm_rel_ebd="layer_norm", share_att_key=True, pooler_dropout=0.0)))


def xlnet():
    return _cls_text(tr.XLNetForSequenceClassification(tr.XLNetConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4,
                                                                      d_inner=37, dropout=0.0, num_labels=C,
                                                                      summary_last_dropout=0.0)))


def mobilebert():
    return _cls_text(tr.MobileBertForSequenceClassification(tr.MobileBertConfig(
        **_bert_kw(), embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2,
        classifier_dropout=0.0)))


def wav2vec2():
    cfg = tr.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            conv_dim=(16, 16), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, feat_extract_norm="group", mask_time_prob=0.0,
                            layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            feat_proj_dropout=0.0, final_dropout=0.0, num_labels=C, classifier_proj_size=16)
    m = tr.Wav2Vec2ForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(7)
    return m, {"input_values": torch.randn(B, 400, generator=g, dtype=torch.float64)}, _cls_targets(), cls_loss


def deberta_v2_two_buckets():
    """DeBERTa-v2 whose relative-embedding table has 2 * position_buckets = 4 = B rows."""
    return _cls_text(tr.DebertaV2ForSequenceClassification(tr.DebertaV2Config(
        **_bert_kw(), relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=2,
        max_relative_positions=16, norm_rel_ebd="layer_norm", share_att_key=True, pooler_dropout=0.0)))


def wav2vec2_layer_norm():
    m, inputs, y, loss = wav2vec2()
    cfg = m.config
    cfg.feat_extract_norm, cfg.do_stable_layer_norm = "layer", True
    return tr.Wav2Vec2ForSequenceClassification(cfg), inputs, y, loss


def dinov2_registers():
    kw = _vit_kw()
    kw.pop("intermediate_size")
    kw["mlp_ratio"] = 2
    m = tr.Dinov2WithRegistersForImageClassification(tr.Dinov2WithRegistersConfig(**kw, num_register_tokens=2))
    return m, {"pixel_values": _pixels()}, _cls_targets(), cls_loss


# more architectures people train (added in the session that measured DeBERTa-v2's tables by the hooks)
def qwen3():
    return _causal(tr.Qwen3ForCausalLM(tr.Qwen3Config(**_llama_kw(), head_dim=8)))


def gemma2():   # its RMSNorm computes in float32 inside a float64 model: about 1e-7
    return _causal(tr.Gemma2ForCausalLM(tr.Gemma2Config(**_llama_kw(), head_dim=8)))


def phi3():
    return _causal(tr.Phi3ForCausalLM(tr.Phi3Config(**_llama_kw(), pad_token_id=0, resid_pdrop=0.0,
                                                    embd_pdrop=0.0)))


def stablelm():
    return _causal(tr.StableLmForCausalLM(tr.StableLmConfig(**_llama_kw(), hidden_dropout=0.0)))


def olmo2():
    return _causal(tr.Olmo2ForCausalLM(tr.Olmo2Config(**_llama_kw())))


def gpt_bigcode():
    return _causal(tr.GPTBigCodeForCausalLM(tr.GPTBigCodeConfig(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)))


def gpt_neo():
    return _causal(tr.GPTNeoForCausalLM(tr.GPTNeoConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=32, window_size=4, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)))


def codegen():
    return _causal(tr.CodeGenForCausalLM(tr.CodeGenConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                          rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                                          attn_pdrop=0.0)))


def modernbert():
    return _cls_text(tr.ModernBertForSequenceClassification(tr.ModernBertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=32, pad_token_id=0, num_labels=C)))


def esm():   # a protein language model with rotary positions
    return _cls_text(tr.EsmForSequenceClassification(tr.EsmConfig(**_bert_kw(), position_embedding_type="rotary",
                                                                  pad_token_id=1)))


def mamba():
    return _causal(tr.MambaForCausalLM(tr.MambaConfig(vocab_size=V, hidden_size=16, state_size=4,
                                                      num_hidden_layers=2, expand=2, conv_kernel=4)))


def rwkv():
    return _causal(tr.RwkvForCausalLM(tr.RwkvConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                                    attention_hidden_size=16, intermediate_size=32,
                                                    context_length=32)))


def funnel():
    return _cls_text(tr.FunnelForSequenceClassification(tr.FunnelConfig(
        vocab_size=V, d_model=32, n_head=4, d_head=8, d_inner=37, block_sizes=[1, 1], hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, num_labels=C)))


MODELS = {name: builder for name, builder in globals().items()
          if callable(builder) and not name.startswith("_") and getattr(builder, "__module__", None) == __name__
          and name not in ("cls_loss", "lm_loss", "regress", "main", "survey_one", "loop_sqnorms")}


def loop_sqnorms(model, loss_fn, inputs, targets) -> dict[str, torch.Tensor]:
    """name -> (B,) |dl_i/dtheta|^2, one example at a time through a copy of the model."""
    model = copy.deepcopy(model)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    rows = {name: [] for name in parameters}
    for i in range(B):
        loss = loss_fn(call_model(model, select_examples(inputs, [i])), select_examples(targets, [i])).sum()
        grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for name, grad in zip(parameters, grads):
            rows[name].append(torch.zeros((), dtype=torch.float64) if grad is None else grad.square().sum())
    return {name: torch.stack(values) for name, values in rows.items()}


def survey_one(name: str, observe: bool = False) -> dict:
    torch.manual_seed(0)
    model, inputs, targets, loss_fn = MODELS[name]()
    model = model.double().train()
    inputs = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
    expected = loop_sqnorms(model, loss_fn, inputs, targets)
    engine = PerExampleGradNorms(model, loss_fn, backend="auto", by_parameter=True)
    floor = 1e-10 * max(float(values.abs().max()) for values in expected.values())
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        if observe:
            with engine.observe(B, model_inputs=inputs) as result:
                loss_fn(call_model(model, inputs), targets).mean().backward()
        else:
            result = engine(inputs, targets)
        results.append(result)
    first, worst = (max(float(((result.by_parameter[n] - v).abs().max() / max(float(v.abs().max()), floor)))
                        for n, v in expected.items()) for result in results)
    first_vmap = sum(backend == "vmap" for backend in results[0].backend_of.values())
    if observe:
        return {"model": name, "max_rel_diff": worst, "first_call_max_rel_diff": first, "first_call_vmap": first_vmap}
    backends = pd.Series(result.backend_of).value_counts().to_dict()
    vmap = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, backend in result.backend_of.items() if backend == "vmap"})
    return {"model": name, "max_rel_diff": worst, "ghost": backends.get("ghost", 0),
            "module": backends.get("module", 0), "vmap": backends.get("vmap", 0), "vmap_parameters": " ".join(vmap),
            "first_call_max_rel_diff": first, "first_call_vmap": first_vmap}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8, help="sequence length (4 = B: T == B)")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--observe", action="store_true", help="measure through observe, as the integrations do")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    LENGTH[:] = [args.length, args.length if args.length != 8 else 6]
    torch.set_num_threads(1)
    rows = []
    for name in tqdm(args.models, desc="survey"):
        try:
            rows.append(survey_one(name, args.observe))
        except Exception as error:   # a model that does not build or run here: reported, not hidden
            rows.append({"model": name, "error": f"{type(error).__name__}: {error}"[:200]})
    table = pd.DataFrame(rows)
    table.insert(1, "length", args.length)
    print(table.to_string(index=False, max_colwidth=90))
    out = args.out or Path(f"data/survey/transformers_length{args.length}{'_observe' if args.observe else ''}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as handle:
        table.to_csv(handle, index=False)
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main()
