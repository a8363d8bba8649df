"""The reference of a step of packed micro-batches, measured from their gradients (the HF Trainer's and
Lightning's padding-free packing tests)."""

from __future__ import annotations

import pytest
import torch

from noisescale.estimators import micro_batch_noise_scale


def assert_packs_estimate(row, contributions: list[torch.Tensor], sequences: list[int], population: int) -> None:
    """``row``'s tr(Sigma) and |G|^2 against ``micro_batch_noise_scale`` of the packs' mean gradients
    g_k = B C_k / b_k, from each pack's contribution C_k to the step's gradient (b_k its sequences, B their sum)."""
    batch = sum(sequences)
    units = torch.stack([batch * c / b for c, b in zip(contributions, sequences)])
    estimate = micro_batch_noise_scale(units.square().sum(1), sequences, sum(contributions).square().sum(),
                                       population=population)
    assert row.trace_sigma == pytest.approx(estimate.trace_sigma, rel=1e-9)
    assert row.grad_sqnorm == pytest.approx(estimate.grad_sqnorm, rel=1e-9)
