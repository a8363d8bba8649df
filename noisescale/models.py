"""Small default models used by the tests, the benchmark and the CLI, and a per-example sequence loss."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.losses import sequence_cross_entropy  # the per-example sequence loss, kept importable from here

__all__ = ["mlp", "lenet5", "tiny_transformer", "byte_gpt", "TinyTransformer", "sequence_cross_entropy",
           "load_model_factory"]


def mlp(in_features: int = 784, hidden: tuple[int, ...] = (512, 512), classes: int = 10) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear to ``classes`` logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    widths = (in_features, *hidden)
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], classes))
    return nn.Sequential(*layers)


def lenet5(classes: int = 10) -> nn.Sequential:
    """LeNet-5-like CNN for 1x28x28 images (LeCun et al. 1998) with ReLU and max pooling, no BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # 6x14x14
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),             # 16x5x5
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from nn.Linear projections and F.scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.projection = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.projection(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    """nanoGPT-like decoder: token + position embeddings, pre-LN blocks, final LayerNorm, head tied to the tokens.

    Positions are embedded per example (indices expanded to (B, T)), so every module sees the batch in dim 0.
    """

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 block_size: int = 64, tied: bool = True, dropout: float = 0.0):
        super().__init__()
        self.block_size = block_size
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tied:
            self.head.weight = self.token.weight

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length = tokens.shape
        if length > self.block_size:
            raise ValueError(f"sequence length {length} exceeds block_size {self.block_size}")
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def tiny_transformer(vocab_size: int = 256, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                     block_size: int = 64, tied: bool = True, dropout: float = 0.0) -> TinyTransformer:
    """The small default language model: logits (B, T, vocab_size) for tokens (B, T)."""
    return TinyTransformer(vocab_size, d_model, n_heads, n_layers, block_size, tied, dropout)


def load_model_factory(spec: str | None) -> Callable[[], nn.Module]:
    """``"package.module:factory"`` -> the factory (a callable returning an nn.Module); None -> the default CNN."""
    if spec is None:
        return lenet5
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec!r}: cannot load {attribute!r} from module {module_name!r}: {error}") from error
    if not callable(factory):
        raise TypeError(f"--model {spec!r}: {attribute!r} is a {type(factory).__name__}, not a callable")
    return factory


def byte_gpt(d_model: int = 64, n_heads: int = 4, n_layers: int = 2, block_size: int = 64,
             dropout: float = 0.0) -> TinyTransformer:
    """A byte-level (vocabulary 256) :class:`TinyTransformer` with nanoGPT's initialisation (Radford et al. 2019):
    weights of Linear and Embedding layers ~ N(0, 0.02^2), the residual output projections ~ N(0, (0.02 /
    sqrt(2 n_layers))^2), biases 0. PyTorch's default N(0, 1) embeddings, tied to the head, start the loss far
    above log(256) nats; this starts it near log(256)."""
    model = TinyTransformer(256, d_model, n_heads, n_layers, block_size, tied=True, dropout=dropout)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith("attention.projection") or name.endswith("mlp.2")
            nn.init.normal_(module.weight, 0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return model
