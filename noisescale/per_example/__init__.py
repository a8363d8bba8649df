"""Per-example squared gradient norms |g_i|^2 from the one real backward pass (ghost hooks, the per-module
fallback, torch.func vmap)."""

from __future__ import annotations

from noisescale.per_example.api import (BACKENDS, ObservedNorms, PerExampleGradNorms, PerExampleNorms,
                                        per_example_sqnorms)
from noisescale.per_example.errors import PerExampleError
from noisescale.per_example.fallback import BATCH_DIMS, BatchDims
from noisescale.per_example.layers import RULES, LayerRule, register_rule, rule_for

__all__ = [
    "BACKENDS",
    "ObservedNorms",
    "PerExampleGradNorms",
    "PerExampleNorms",
    "PerExampleError",
    "per_example_sqnorms",
    "RULES",
    "LayerRule",
    "register_rule",
    "rule_for",
    "BATCH_DIMS",
    "BatchDims",
]
