"""Per-example squared gradient norms |g_i|^2 from the one real backward pass (ghost hooks, torch.func vmap)."""

from __future__ import annotations

from noisescale.per_example.api import BACKENDS, PerExampleGradNorms, PerExampleNorms, per_example_sqnorms
from noisescale.per_example.layers import RULES, LayerRule, rule_for

__all__ = [
    "BACKENDS",
    "PerExampleGradNorms",
    "PerExampleNorms",
    "per_example_sqnorms",
    "RULES",
    "LayerRule",
    "rule_for",
]
