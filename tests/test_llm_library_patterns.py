"""Patterns of LLM libraries (torchtune, x-transformers) that went to a slower path: exact against the loop and
measured by the cheap path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.per_example import PerExampleGradNorms
from tests.test_parameter_uses import counted_reruns
from tests.test_per_example import naive_per_example

B, T, D = 5, 6, 8


class ScaleRMSNorm(nn.Module):
    """torchtune.modules.RMSNorm: its parameter is ``scale``, the norm runs in float32 by F.rms_norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), normalized_shape=self.normalized_shape, weight=self.scale,
                          eps=self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(D, D), ScaleRMSNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


def sequence_mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=(1, 2))


def test_an_rms_norm_whose_weight_is_named_scale_has_the_ghost_rule():
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.norm.scale.normal_()
    x, y = torch.randn(B, T, D), torch.randn(B, T, 3)
    expected = naive_per_example(model, sequence_mse, x, y)
    result = PerExampleGradNorms(model, sequence_mse, by_parameter=True)(x, y)
    assert result.backend_of["norm.scale"] == "ghost"
    for name, values in expected.items():   # float32 throughout: float32's rounding
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-5, atol=1e-12, msg=name)


class MemoryTokens(nn.Module):
    """x-transformers' memory tokens: a parameter repeated to the batch, its shape read (einops.pack), reshaped
    to (b, -1, d) and packed before the sequence."""

    def __init__(self):
        super().__init__()
        self.memory = nn.Parameter(torch.randn(2, D))
        self.body = nn.Linear(D, D)

    def forward(self, x):
        mem = self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)
        shapes = [mem.shape, x.shape]   # einops.pack reads the shapes of what it packs
        assert shapes[0][0] == shapes[1][0]
        h = torch.cat([mem.reshape(x.shape[0], -1, D), x.reshape(x.shape[0], -1, D)], dim=1)
        return self.body(h)[:, 2:]


def test_a_parameter_expanded_to_the_batch_whose_shape_is_read_is_captured_not_re_run(monkeypatch):
    torch.manual_seed(0)
    model = MemoryTokens().double()
    x, y = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    expected = naive_per_example(model, sequence_mse, x, y)
    norms = PerExampleGradNorms(model, sequence_mse, by_parameter=True)
    norms(x, y)   # the first capture is confirmed by a re-run
    reruns = counted_reruns(monkeypatch)
    result = norms(x, y)
    assert not reruns
    assert result.backend_of["memory"] == "module"
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)


class LoRALinear(nn.Module):
    """litgpt.lora.LoRALinear, trimmed: an nn.Linear child plus (drop(x) @ A^T @ B^T) * scaling."""

    def __init__(self, d_in: int, d_out: int, r: int = 2, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.lora_A, self.lora_B = nn.Parameter(torch.randn(r, d_in)), nn.Parameter(torch.randn(d_out, r))
        self.scaling, self.merged = 2.0 / r, False
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else (lambda x: x)

    def forward(self, x):
        pretrained = self.linear(x)
        if self.merged:
            return pretrained
        return pretrained + (self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) \
            * self.scaling


class LoRABlock(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.up, self.down = LoRALinear(D, 2 * D, dropout=dropout), LoRALinear(2 * D, 3, dropout=dropout)
        for layer in (self.up, self.down):
            layer.linear.requires_grad_(False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_litgpt_lora_layers_have_a_ghost_rule_checked_on_every_call():
    """They were re-run per example on every call (litgpt with LoRA on every layer: 4.1x a plain step). A merged
    layer's adapter is no longer in the output: zero norms."""
    torch.manual_seed(0)
    model = LoRABlock().double()
    x, y = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, 3, dtype=torch.float64)
    norms = PerExampleGradNorms(model, sequence_mse, by_parameter=True)
    for merged in (False, False, True):
        model.up.merged = merged
        expected = naive_per_example(model, sequence_mse, x, y)
        result = norms(x, y)
        assert {result.backend_of[f"{layer}.lora_{m}"] for layer in ("up", "down") for m in "AB"} == {"ghost"}
        for name, values in expected.items():
            torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)
    assert sum(result.by_parameter[f"up.lora_{m}"].sum() for m in "AB") == 0


def test_a_lora_layer_with_dropout_in_train_mode_goes_to_the_fallback():
    torch.manual_seed(0)
    model = LoRABlock(dropout=0.1).double()
    x, y = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, 3, dtype=torch.float64)
    assert PerExampleGradNorms(model, sequence_mse)(x, y).backend_of["up.lora_A"] == "module"
    model.eval()
    expected = naive_per_example(model, sequence_mse, x, y)
    result = PerExampleGradNorms(model, sequence_mse, by_parameter=True)(x, y)
    assert result.backend_of["up.lora_A"] == "ghost"
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)


def test_a_lora_layer_that_scales_its_input_by_another_function_goes_to_the_fallback():
    torch.manual_seed(0)
    model = LoRABlock().double()
    model.up.lora_dropout = lambda x: 2 * x
    x, y = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, 3, dtype=torch.float64)
    expected = naive_per_example(model, sequence_mse, x, y)
    result = PerExampleGradNorms(model, sequence_mse, by_parameter=True)(x, y)
    assert result.backend_of["up.lora_A"] == "module" and result.backend_of["down.lora_A"] == "ghost"
    for name, values in expected.items():
        torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)


class ExpertMLP(nn.Module):
    """litgpt's LLaMAMLP: proj(silu(fc_1(x)) * fc_2(x))."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc_1, self.fc_2 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class LoopedMoE(nn.Module):
    """A mixture of experts with a module per expert, each run on the tokens routed to it, picked by an index:
    litgpt's LLaMAMoE (``expert(x[token_idx])``, ``y[token_idx] += ...``), transformers 4's Mixtral and
    SwitchTransformers (``expert(hidden[None, top_x])``, ``index_add_``), or litgpt's on tokens flattened position
    by position (``token_major``: a token's row is no longer its example's block); the other layouts are litgpt's.
    The routing weights' softmax runs in the tokens' dtype (litgpt's in float32, whose rounding would blur a float64
    comparison)."""

    def __init__(self, layout: str, d: int = D, hidden: int = 12, experts: int = 4, k: int = 2):
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(d, hidden) for _ in range(experts))
        self.layout, self.k = layout, k

    def forward(self, x):
        batch, length, d = x.shape
        x = x.transpose(0, 1).reshape(-1, d) if self.layout == "token_major" else x.reshape(-1, d)
        probs, indices = torch.topk(self.gate(x), self.k)
        probs = probs.softmax(dim=1)
        if self.layout == "idle_expert":   # the last expert gets no token, and is called on none (as litgpt does)
            indices = indices.clamp(max=len(self.experts) - 2)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, expert_idx = torch.where(indices == e)
            if self.layout == "transformers4":
                routed = expert(x[None, token_idx].reshape(-1, d))
                y.index_add_(0, token_idx, routed * probs[token_idx, expert_idx, None])
            else:
                y[token_idx] += probs[token_idx, expert_idx, None] * expert(x[token_idx])
        if self.layout == "token_major":
            return y.view(length, batch, d).transpose(0, 1)
        return y.view(batch, length, d)


class WrittenNorm(nn.Module):
    """An RMS norm written out with a parameter of its own name, which no rule takes: a module the fallback
    measures, computing each output row from its input row alone (``broadcast.row_by_row_call``)."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


class MoEBlock(nn.Module):
    def __init__(self, layout: str):
        super().__init__()
        self.embed, self.norm = nn.Embedding(11, D), WrittenNorm(D) if layout == "written_norm" else nn.LayerNorm(D)
        self.moe, self.head = LoopedMoE(layout), nn.Linear(D, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head((x + self.moe(self.norm(x))).mean(1))


@pytest.mark.parametrize("layout", ["litgpt", "transformers4", "written_norm", "idle_expert", "token_major"])
def test_experts_run_on_the_tokens_routed_to_them_are_measured_by_their_rules(layout):
    """Each expert's Linear layers run on rows picked by an index from the B examples' T token rows: row r is
    example index[r] // T's (``broadcast.picked_owners``), padded into a (B, K, d) block per example for the
    rule. Before, every expert went to the whole-model vmap (HF SwitchTransformers' row of
    ``analysis/bench_per_example.py``: 10.9x a plain step before, 2.4x now). The tokens' rows may come from a
    norm without a rule (``written_norm``) as from a rule layer; an expert called on no token (``idle_expert``)
    adds nothing (its first call crashed the rule's check). Exact against the loop in float64 over three batches;
    no whole-model vmap, except where the tokens were flattened position by position (then their examples cannot
    be read from the index: the vmap, exact); p.grad as a plain backward's."""
    torch.manual_seed(0)
    model = MoEBlock(layout).double()
    generator = torch.Generator().manual_seed(1)
    engine = PerExampleGradNorms(model, nn.CrossEntropyLoss(reduction="none"), by_parameter=True)
    for _ in range(3):
        tokens = torch.randint(0, 11, (B, T), generator=generator)
        targets = torch.randint(0, 3, (B,), generator=generator)
        expected = naive_per_example(model, nn.CrossEntropyLoss(reduction="none"), (tokens,), targets)
        model.zero_grad(set_to_none=True)
        (nn.CrossEntropyLoss(reduction="none")(model(tokens), targets).mean()).backward()
        plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        result = engine((tokens,), targets)
        for name, values in expected.items():
            torch.testing.assert_close(result.by_parameter[name], values, rtol=1e-9, atol=1e-15, msg=name)
        assert {name: p.grad for name, p in model.named_parameters() if p.grad is not None}.keys() == plain.keys()
        assert all(torch.equal(p.grad, plain[name]) for name, p in model.named_parameters() if p.grad is not None)
        experts = {backend for name, backend in result.backend_of.items() if ".experts." in name}
        assert experts == ({"vmap"} if layout == "token_major" else {"ghost"})
