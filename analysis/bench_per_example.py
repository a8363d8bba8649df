"""Benchmark: cost of per-example gradient norms against a plain training step.

Models: the project's own three (MLP 784-512-512-10 at B=128, LeNet-5-like CNN on 28x28 at B=128, a 2-layer
transformer with d=128, 4 heads, T=64, vocab 256 at B=32), a VGG-style CNN on 3x32x32 images at B=64 (``vgg``:
six 3x3 convolutions of 32 to 128 channels) and, at B=16, T=32, models nobody here wrote, from
small configs with random weights and dropout 0, so that every method measures the same gradients (nothing is
downloaded): HuggingFace GPT-2, BERT (sequence classification, padding mask), Llama and OPT (attention mask; OPT
runs its MLP on (B * T, d) rows), ViT (32x32 images, 8x8 patches) and BART (d=64, 2 layers each, 4 heads, vocab
512; ``gpt2_vocab``: GPT-2 with its own vocabulary of 50257, tied to the output layer), a classifier on torch's
nn.TransformerEncoder (key padding mask) and one on nn.LSTM. It times one forward+backward step for

    plain         forward + loss.mean().backward()
    ghost         noisescale, layer rules only (raises where a module has none)
    auto          noisescale, rules, the per-module fallback, whole-model vmap for the rest
    vmap          noisescale, torch.func vmap(grad) for every parameter
    backpack      BackPACK BatchL2Grad (extend + backward)
    opacus        Opacus GradSampleModule (per-example gradients, then their norms)
    opacus_ghost  Opacus GradSampleModuleFastGradientClipping with ghost clipping: its first backward, which
                  leaves the mean gradient in p.grad and the per-example norms in get_norm_sample() (the
                  second, clipped backward of DP training is not run)

and reports the median time over interleaved repetitions after warm-up, the step's matrix-product and convolution
arithmetic (torch's FlopCounterMode; ``flop_ratio``: what the method's arithmetic alone predicts, since
noisescale's rules take the cheaper of the Gram and materialised forms this is the floor of their approach on a
machine that is compute-bound), and the peak memory of the tensors
the step allocates (a TorchDispatchMode counts live storages, so it works on CPU where torch keeps no
allocator statistics; on CUDA the allocator's peak is used), both as ratios to `plain` measured in the same
run, at each thread count of ``--threads`` (CPU). Peers that cannot be installed or that reject a model are
listed with the reason. Each method's per-example squared norms are also compared with noisescale's `vmap`
result (max relative difference).

    python analysis/bench_per_example.py [--repeats 15] [--device cpu|cuda] [--threads 1 2]
                                         [--models mlp cnn transformer gpt2 ...] [--out data/bench/per_example.csv]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop
from tqdm import tqdm

from noisescale.batches import call_model
from noisescale.losses import logits_of, per_example_cross_entropy
from noisescale.models import lenet5, mlp, sequence_cross_entropy, tiny_transformer
from noisescale.per_example import PerExampleGradNorms

MODELS = ["mlp", "cnn", "vgg", "transformer", "gpt2", "gpt2_vocab", "bert", "deberta", "llama", "mixtral", "opt", "vit",
          "swin", "bart", "t5", "switch", "torch_encoder", "lstm"]
THIRD_PARTY_BATCH, THIRD_PARTY_LENGTH, VOCAB = 16, 32, 512


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block, autograd's included."""

    def __enter__(self):
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()
        return super().__enter__()

    def _release(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # functorch wrappers carry no storage of their own
                continue
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._alive:
                continue
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def causal_lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    return sequence_cross_entropy(outputs, labels, shift=True)


class EncoderClassifier(torch.nn.Module):
    """Token embedding, torch's nn.TransformerEncoder (2 layers, d=64, 4 heads, key padding mask), first token."""

    def __init__(self, vocab: int = VOCAB, width: int = 64, classes: int = 3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = torch.nn.Linear(width, classes)

    def forward(self, tokens, padding_mask):
        return self.out(self.encoder(self.embed(tokens), src_key_padding_mask=padding_mask)[:, 0])


def vgg_cnn(width: int = 32, classes: int = 10) -> torch.nn.Sequential:
    """A VGG-style CNN for 3x32x32 images: three blocks of two 3x3 convolutions (``width``, 2x, 4x channels), ReLU
    and 2x2 max pooling, then a linear head; no BatchNorm (it couples the examples in train mode)."""
    layers, channels = [], 3
    for out in (width, 2 * width, 4 * width):
        layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.ReLU(),
                   torch.nn.Conv2d(out, out, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        channels = out
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(channels * 4 * 4, classes))


def image_batch(batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 32, 32) random images and labels, from a generator of their own (the other cases' data unchanged)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


class LSTMClassifier(torch.nn.Module):
    """nn.LSTM (1 layer, 32 -> 64, batch first) over the sequence, mean over time, linear head."""

    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 3):
        super().__init__()
        self.rnn = torch.nn.LSTM(features, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(self.rnn(x)[0].mean(1))


def third_party_cases(generator: torch.Generator) -> dict[str, Callable[[], tuple]]:
    """name -> a builder of (model, per-example loss, inputs, targets); HuggingFace ones from small configs."""
    batch, length = THIRD_PARTY_BATCH, THIRD_PARTY_LENGTH
    tokens = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(0, batch, 2):   # every other example padded to a different length
        mask[i, length // 2 + i:] = 0
    classes = torch.randint(0, 3, (batch,), generator=generator)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    sequences = torch.randn(batch, length, 32, generator=generator)
    short = torch.randint(3, VOCAB, (batch, length // 4), generator=generator)

    def hf(name):
        import transformers
        return getattr(transformers, name)

    small = dict(vocab_size=VOCAB)
    return {
        "gpt2": lambda: (hf("GPT2LMHeadModel")(hf("GPT2Config")(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                                **small)),
                         causal_lm_loss, {"input_ids": tokens}, tokens),
        # GPT-2's own vocabulary, tied to the output layer: the (B, V, d) per-example gradients of the tied
        # table are what a language model's norms must not materialise
        "gpt2_vocab": lambda: (hf("GPT2LMHeadModel")(hf("GPT2Config")(n_layer=2, n_embd=64, n_head=4,
                                                                      n_positions=64, resid_pdrop=0.0,
                                                                      embd_pdrop=0.0, attn_pdrop=0.0)),
                               causal_lm_loss, {"input_ids": tokens}, tokens),
        "bert": lambda: (hf("BertForSequenceClassification")(hf("BertConfig")(
                             num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                             max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, **small)),
                         per_example_cross_entropy, {"input_ids": tokens, "attention_mask": mask}, classes),
        "llama": lambda: (hf("LlamaForCausalLM")(hf("LlamaConfig")(
                              num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128, max_position_embeddings=64, attention_dropout=0.0,
                              **small)),
                          causal_lm_loss, {"input_ids": tokens, "attention_mask": mask},
                          tokens.masked_fill(mask == 0, -100)),
        # a sparse mixture of experts: the B T tokens routed to 2 of 8 experts held in 3-D weights (experts.py)
        "mixtral": lambda: (hf("MixtralForCausalLM")(hf("MixtralConfig")(
                                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                                max_position_embeddings=64, attention_dropout=0.0, **small)),
                            causal_lm_loss, {"input_ids": tokens, "attention_mask": mask},
                            tokens.masked_fill(mask == 0, -100)),
        # OPT runs its MLP on the examples flattened into (B * T, d) rows
        "opt": lambda: (hf("OPTForCausalLM")(hf("OPTConfig")(
                            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                            max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                            **small)),
                        causal_lm_loss, {"input_ids": tokens, "attention_mask": mask},
                        tokens.masked_fill(mask == 0, -100)),
        # DeBERTa-v2 (and v3): a relative-embedding table, layer-normed and projected by the attention's own query
        # and key layers, repeated over the examples' heads (broadcast.py)
        "deberta": lambda: (hf("DebertaV2ForSequenceClassification")(hf("DebertaV2Config")(
                                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, relative_attention=True,
                                pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=64,
                                norm_rel_ebd="layer_norm", share_att_key=True, pooler_dropout=0.0, **small)),
                            per_example_cross_entropy, {"input_ids": tokens, "attention_mask": mask}, classes),
        "vit": lambda: (hf("ViTForImageClassification")(hf("ViTConfig")(
                            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                            image_size=32, patch_size=8, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)),
                        per_example_cross_entropy, {"pixel_values": images}, classes),
        # Swin's windows: its layers on (B * windows, N, d) rows, its relative-position bias on them
        "swin": lambda: (hf("SwinForImageClassification")(hf("SwinConfig")(
                             image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                             window_size=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             drop_path_rate=0.0)),
                         per_example_cross_entropy, {"pixel_values": images}, classes),
        "bart": lambda: (hf("BartForConditionalGeneration")(hf("BartConfig")(
                             encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                             max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, **small)),
                         sequence_cross_entropy, {"input_ids": tokens, "attention_mask": mask, "labels": short},
                         short),
        # T5's relative position tables enter the attention mask, computed once for all the examples (broadcast.py)
        "t5": lambda: (hf("T5ForConditionalGeneration")(hf("T5Config")(
                           num_layers=2, d_model=64, d_kv=16, d_ff=128, num_heads=4, dropout_rate=0.0,
                           decoder_start_token_id=0, **small)),
                       sequence_cross_entropy, {"input_ids": tokens, "attention_mask": mask, "labels": short}, short),
        # a mixture of experts with a module per expert, each run on the tokens routed to it (picked by an index)
        "switch": lambda: (hf("SwitchTransformersForConditionalGeneration")(hf("SwitchTransformersConfig")(
                               num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, d_ff=128, num_heads=4,
                               num_experts=8, expert_capacity=THIRD_PARTY_BATCH * THIRD_PARTY_LENGTH,
                               encoder_sparse_step=1, decoder_sparse_step=1, dropout_rate=0.0, router_jitter_noise=0.0,
                               decoder_start_token_id=0, **small)),
                           sequence_cross_entropy, {"input_ids": tokens, "attention_mask": mask, "labels": short},
                           short),
        "torch_encoder": lambda: (EncoderClassifier(), per_example_cross_entropy, (tokens, mask == 0), classes),
        "lstm": lambda: (LSTMClassifier(), per_example_cross_entropy, sequences, classes),
    }


def make_cases(device: torch.device, names: list[str]) -> dict[str, tuple]:
    """name -> (model, per-example loss, inputs, targets) for the models in ``names``, seeded; a model whose
    library is missing maps to the reason."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images = torch.randn(128, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    tokens = torch.randint(0, 256, (32, 65), generator=generator)
    builders = {
        "mlp": lambda: (mlp(), classification_loss, images.flatten(1), labels),
        "cnn": lambda: (lenet5(), classification_loss, images, labels),
        "vgg": lambda: (vgg_cnn(), classification_loss, *image_batch()),
        "transformer": lambda: (tiny_transformer(), sequence_cross_entropy, tokens[:, :-1], tokens[:, 1:]),
        **third_party_cases(generator),
    }
    cases = {}
    for name in names:
        torch.manual_seed(0)
        try:
            model, loss_fn, inputs, targets = builders[name]()
        except ImportError as error:
            cases[name] = f"not installed ({error})"
            continue
        cases[name] = (model.to(device), loss_fn, to_device(inputs, device), to_device(targets, device))
    return cases


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return tuple(to_device(item, device) for item in value)


def batch_of(inputs) -> int:
    return tree_flatten(inputs)[0][0].shape[0]


def plain_step(model, loss_fn):
    def step(inputs, targets):
        loss_fn(call_model(model, inputs), targets).mean().backward()

    return step


def noisescale_step(backend: str):
    def make(model, loss_fn):
        engine = PerExampleGradNorms(model, loss_fn, backend=backend)
        return lambda inputs, targets: engine(inputs, targets).sqnorms

    return make


def backpack_step(model, loss_fn):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    if loss_fn not in (classification_loss, per_example_cross_entropy):
        raise NotImplementedError("BatchL2Grad needs a BackPACK-extended loss module; sequence losses are not")
    model, criterion = extend(model), extend(torch.nn.CrossEntropyLoss(reduction="mean"))

    def step(inputs, targets):
        loss = criterion(logits_of(call_model(model, inputs)), targets)
        with backpack(BatchL2Grad()):
            loss.backward()
        missing = sorted({type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)
                          if p.requires_grad and not hasattr(p, "batch_l2")})
        if missing:  # BackPACK skips layers it has no extension for (a warning), which would understate the norms
            raise NotImplementedError(f"BatchL2Grad has no extension for {', '.join(missing)}")
        # BatchL2Grad gives |grad of l_i / B|^2 for a mean loss; rescale to |g_i|^2.
        return sum(p.batch_l2 for p in model.parameters() if p.requires_grad) * batch_of(inputs) ** 2

    return step


def opacus_ready(model):
    """The model as Opacus users run it: ``ModuleValidator.fix`` swaps the layers Opacus cannot hook
    (nn.MultiheadAttention, nn.LSTM) for its own DP versions (same maths, a copy of the model)."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def opacus_step(model, loss_fn):
    from opacus import GradSampleModule

    model = opacus_ready(model)
    module = GradSampleModule(model, loss_reduction="mean", batch_first=True)

    def step(inputs, targets):
        loss_fn(call_model(module, inputs), targets).mean().backward()
        # with loss_reduction="mean" Opacus rescales grad_sample to the per-example gradients g_i themselves
        sqnorms = sum(
            p.grad_sample.reshape(batch_of(inputs), -1).square().sum(1) for p in model.parameters() if p.requires_grad
        )
        for p in model.parameters():  # Opacus accumulates grad_sample across steps unless it is cleared
            p.grad_sample = None
        return sqnorms

    return step, model


def opacus_ghost_step(model, loss_fn):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = opacus_ready(model)
    module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                  max_grad_norm=1.0, use_ghost_clipping=True)

    def step(inputs, targets):
        loss_fn(call_model(module, inputs), targets).mean().backward()
        return module.get_norm_sample().square()   # |g_i| per example (backprops rescaled by B for "mean")

    return step, model


def available_methods() -> tuple[dict[str, Callable], dict[str, str]]:
    """Step factories (model, loss_fn) -> step(inputs, targets), or (step, the model it trains) where the peer
    replaces the model, of the methods that can run here, and why the others cannot."""
    factories = {"plain": plain_step, **{b: noisescale_step(b) for b in ("ghost", "auto", "vmap")}}
    missing = {}
    for name, factory, module in (("backpack", backpack_step, "backpack"), ("opacus", opacus_step, "opacus"),
                                  ("opacus_ghost", opacus_ghost_step, "opacus")):
        try:
            __import__(module)
            factories[name] = factory
        except ImportError as error:
            missing[name] = f"not installed ({error}); see README: pip install -c constraints '.[bench]'"
    return factories, missing


def zero_grads(model: torch.nn.Module) -> None:
    model.zero_grad(set_to_none=True)


def measure_peak(step, model, inputs, targets, device) -> int:
    zero_grads(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(inputs, targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakTensorMemory() as tracker:
        step(inputs, targets)
    return tracker.peak


def grouped_convolution_backward_flop(*args, out_shape=None, **kwargs) -> int:
    """torch's count for a convolution's backward (on shapes: ``FlopCounterMode``'s custom mapping), its
    weight-gradient part divided by the groups: torch 2.13 counts the weight gradient of a grouped convolution as if
    every group read every input channel (noisescale's per-example kernel gradients are one convolution with B
    groups: counted B times over)."""
    count = conv_backward_flop.__wrapped__   # torch's formula on shapes
    groups, mask = args[9], list(args[10])
    total = count(*args, out_shape=out_shape, **kwargs)
    if not mask[1] or groups == 1:
        return total
    without_weight = count(*args[:10], [mask[0], False, mask[2]], *args[11:], out_shape=out_shape, **kwargs)
    return without_weight + (total - without_weight) // groups


def count_flops(step, model, inputs, targets) -> int | None:
    """Floating-point operations of one step as torch's FlopCounterMode counts them (matrix products,
    convolutions and attention; elementwise work and reductions are not counted); None where the step cannot run
    under it (its module tracker's backward hooks inside torch.func's grad, as HF DeBERTa's whole-model vmap)."""
    zero_grads(model)
    try:
        with FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten.convolution_backward: grouped_convolution_backward_flop}) as counter:
            step(inputs, targets)
    except RuntimeError:
        return None
    return counter.get_total_flops()


def time_once(step, model, inputs, targets, device) -> float:
    zero_grads(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(inputs, targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def max_relative_difference(sqnorms: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    if sqnorms is None or reference is None:
        return float("nan")
    return ((sqnorms.detach().double() - reference.double()).abs() / reference.double().abs()).max().item()


def bench_model(name, case, factories, repeats, warmup, device) -> list[dict]:
    """Every method on its own copy of the model (peers and hooks modify the model they wrap)."""
    model, loss_fn, inputs, targets = case
    prepared, failures, sqnorms = {}, {}, {}
    for method, factory in factories.items():  # set-up, warm-up and failure detection
        copy = deepcopy(model)
        try:
            step = factory(copy, loss_fn)
            if isinstance(step, tuple):
                step, copy = step
            for _ in range(warmup):
                zero_grads(copy)
                sqnorms[method] = step(inputs, targets)
            prepared[method] = (step, copy)
        except Exception as error:  # a peer rejecting a model is a result to report, not a crash
            failures[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    times = {method: [] for method in prepared}
    for _ in tqdm(range(repeats), desc=name, leave=False):  # interleaved: load drifts hit every method alike
        for method, (step, copy) in prepared.items():
            times[method].append(time_once(step, copy, inputs, targets, device))
    peaks = {method: measure_peak(step, copy, inputs, targets, device) for method, (step, copy) in prepared.items()}
    flops = {method: count_flops(step, copy, inputs, targets) for method, (step, copy) in prepared.items()}
    plain_time, plain_peak = statistics.median(times["plain"]), peaks["plain"]
    rows = []
    for method in factories:
        row = {"model": name, "method": method, "parameters": sum(p.numel() for p in model.parameters())}
        if method in prepared:
            median = statistics.median(times[method])
            row |= {
                "median_ms": 1e3 * median,
                "time_ratio": median / plain_time,
                "flop_ratio": float("nan") if flops[method] is None else flops[method] / flops["plain"],
                "peak_mb": peaks[method] / 2**20,
                "memory_ratio": peaks[method] / plain_peak,
                "max_rel_diff_vs_vmap": max_relative_difference(sqnorms.get(method), sqnorms.get("vmap")),
                "status": "ok",
            }
        else:
            row["status"] = failures[method]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()],
                        help="CPU thread counts to run at (torch.set_num_threads), one table block each")
    parser.add_argument("--out", type=Path, default=Path("data/bench/per_example.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    factories, missing = available_methods()
    rows = []
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    for name, case in make_cases(device, args.models).items():
        if isinstance(case, str):
            rows.append({"model": name, "method": "plain", "status": case})
            continue
        for count in threads:
            torch.set_num_threads(count)
            block = bench_model(name, case, factories, args.repeats, args.warmup, device)
            block += [{"model": name, "method": method, "status": why} for method, why in missing.items()]
            rows += [row | {"threads": count} for row in block]
    table = pd.DataFrame(rows)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine())
    table["device"] = machine
    table["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    shown = table[["model", "threads", "method", "median_ms", "time_ratio", "flop_ratio", "peak_mb", "memory_ratio",
                   "max_rel_diff_vs_vmap", "status"]]
    print(f"device: {machine}; torch {torch.__version__}; median of {args.repeats} interleaved repeats")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
