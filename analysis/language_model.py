"""A byte-level GPT on the shipped SymPy-core text with AdamW: the critical batch size by branching over training
(Merrill et al. 2025) against B_simple and B_noise (McCandlish et al. 2018), per layer type with the
normalisation-layers-only estimate (Gray et al. 2024), and a batch-size warmup from the measured curve against the
fixed-batch baseline at equal tokens.

1. Reference run: byte_gpt (TinyTransformer with nanoGPT initialisation; d_model 64, 4 heads, 2 layers, block
   64, tied head, ~120k parameters), AdamW
   (betas 0.9/0.95, weight decay 0.1, clip 1.0), peak lr 3e-3, 5 % linear warmup, cosine to 10 %, batch 32, 600
   steps (1.2M tokens). Every step the per-example gradient norms (ghost hooks, by parameter) give B_simple of the
   whole model and of each layer type (moving averages, decay 0.95); every 50 steps B_noise (Hessian proxies,
   averaged with decay 0.8). All from the raw gradients (before clipping and before Adam's preconditioning).
2. Branches from 5 checkpoints at B = 8 ... 256, learning rate eta_c sqrt(B / 32), 2048 sequences each
   (131k tokens), 2 seeds; B_crit with a 1 % relative loss tolerance against the B = 8 branch.
3. Batch-size warmup, 3 seeds per arm, all 19,200 sequences (1.2M tokens) with the same warmup + cosine schedule
   in tokens: ``fixed`` B = 32, and ``fixed_64``, ``fixed_128`` (the simplest way to fewer steps); ``warmup``: B
   follows the B_crit curve measured by branching (power of two in [8, 256]); ``warmup_floor``: the same but never
   below 32 (Merrill et al.'s recipe grows from the baseline batch); ``adaptive`` and ``adaptive_floor``: B follows
   B_simple measured online in the run itself (per-example norms every step, moving average decay 0.95) through the
   library's ``NoiseScaleBatchPolicy`` (kappa 1, at most doubling a step, never decreasing), from 8 in [8, 256] and
   from 32 in [32, 256]: what a user without the branching gets. Every arm's learning rate is multiplied by
   sqrt(B / 32).
4. ``--tune-lr``: the learning rate tuned at equal tokens for the strongest simple baseline, fixed B = 8, 12, 16, 20,
   24, 32, 40, 64, for the online policy from 8, and for ``ramp_E``, straight lines from B = 8 to E = 40, 80, 160 in
   examples seen: batch growth without measurement, a control for the schedule's shape (E = 80 takes about the
   online policy's steps). Factors 0.5, 1, 2 of the arms' rate on seed 0, widened past the grid's edge, then
   refined by sqrt(2); the best factor on 5 seeds;
   data/lm/tuned_lr*.csv, resumable on the same machine (finished runs in tuned_lr_curves.csv are not trained
   again).

    OMP_NUM_THREADS=1 nice -n 10 python analysis/language_model.py [--device cuda] [--quick] [--arms ARM ...]

Writes data/lm/*.csv, data/lm/summary.json and data/lm/*.png; resumable (the reference checkpoints are kept in
runs/language_model/, the branches CSV skips finished branches; ``--arms`` runs only those warmup arms and keeps
the other arms' rows of the existing warmup_curves.csv). ``--quick`` runs a tiny smoke version to
runs/language_model_quick/ instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noisescale.checkpoints import atomic_write  # noqa: E402
from noisescale.controller import NoiseScaleBatchPolicy  # noqa: E402
from noisescale.branching import (  # noqa: E402
    LanguageModelSettings, batch_size_warmup, critical_batch_sizes, load_checkpoints, run_branches,
    save_checkpoints, train_language_model, train_reference_run, validation_loss, warmup_cosine,
)
from noisescale.devices import resolve_device  # noqa: E402
from noisescale.estimators import ExponentialMovingNoiseScale, ExponentialMovingRatio, simple_noise_scale  # noqa
from noisescale.hessian import hessian_noise_scale  # noqa: E402
from noisescale.models import byte_gpt, sequence_cross_entropy  # noqa: E402
from noisescale.per_example import PerExampleGradNorms  # noqa: E402
from noisescale.text import load_shipped_corpus, unigram_cross_entropy  # noqa: E402

OUT = ROOT / "data" / "lm"
LAYER_TYPES = ("embeddings", "attention", "mlp", "normalisation")


def experiment(quick: bool) -> dict:
    """The experiment's sizes (module docstring); ``quick``: a smoke test of every stage in about a minute."""
    if quick:
        return dict(model=dict(d_model=32, n_heads=2, n_layers=1, block_size=32),
                    settings=LanguageModelSettings(block_size=32, batch_size=16, validation_windows=64),
                    reference_steps=60, checkpoint_steps=(10, 30), hessian_every=20, branch_batch_sizes=(4, 8, 16, 32),
                    branch_examples=128, branch_seeds=(0, 1), tolerance=0.01, warmup_seeds=(0, 1), evaluations=4,
                    tune_seeds=(0, 1), ramp_ends=(16,))
    return dict(model=dict(d_model=64, n_heads=4, n_layers=2, block_size=64),
                settings=LanguageModelSettings(block_size=64, batch_size=32, learning_rate=3e-3,
                                               validation_windows=256),
                reference_steps=600, checkpoint_steps=(30, 75, 150, 300, 450), hessian_every=50,
                branch_batch_sizes=(8, 16, 32, 64, 128, 256), branch_examples=2048, branch_seeds=(0, 1),
                tolerance=0.01, warmup_seeds=(0, 1, 2), evaluations=8, tune_seeds=(0, 1, 2, 3, 4),
                # (19,200 / (E - 8)) ln(E / 8) steps on the straight line from 8 to E: 966, 614 (the online policy's
                # ~600) and 378
                ramp_ends=(40, 80, 160))


def layer_type(model: nn.Module, parameter_name: str) -> str:
    """embeddings | attention | mlp | normalisation | other, from the module that owns the parameter."""
    path = parameter_name.rpartition(".")[0]
    module = dict(model.named_modules())[path]
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return "normalisation"
    if any(word in path for word in ("attention", "attn")):
        return "attention"
    if any(word in path for word in ("mlp", "ffn", "feed_forward")):
        return "mlp"
    return "other"


class LayerTypeNoiseScale:
    """The backward of the reference run: per-example norms by parameter -> B_simple of the model and of each layer
    type (moving averages of tr(Sigma) and |G|^2, McCandlish et al. appendix A), B_noise every ``hessian_every``.

    For a layer type with parameter set P: s_i = sum_{p in P} |g_i,p|^2 and |gbar_P|^2 = sum_{p in P} |p.grad|^2
    (p.grad is the batch-mean gradient: the loop zeroes it before each step). Gray et al. (2024) found the
    normalisation layers' estimate close to the whole model's.
    """

    def __init__(self, model: nn.Module, hessian_every: int, decay: float = 0.95, seed: int = 0):
        self.model, self.hessian_every, self.seed = model, hessian_every, seed
        self.norms = PerExampleGradNorms(model, sequence_cross_entropy, by_parameter=True)
        self.groups: dict[str, list[str]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self.groups.setdefault(layer_type(model, name), []).append(name)
        self.averages = {group: ExponentialMovingNoiseScale(decay) for group in ("all", *self.groups)}
        self.hessian_average = ExponentialMovingRatio(0.8)
        self.step = 0
        self.row: dict = {}

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        result = self.norms(inputs, targets)
        grads = dict(self.model.named_parameters())
        row = {}
        parts = {"all": (result.sqnorms, result.grad_sqnorm)}
        for group, names in self.groups.items():
            parts[group] = (sum(result.by_parameter[n] for n in names),
                            sum(torch.linalg.vector_norm(grads[n].grad, dtype=torch.float64).square() for n in names))
        for group, (sqnorms, grad_sqnorm) in parts.items():
            self.averages[group].update_estimate(simple_noise_scale(sqnorms, grad_sqnorm))
            row[f"b_simple_{group}"] = self.averages[group].b_simple
            row[f"trace_sigma_{group}"] = self.averages[group].trace_sigma
            row[f"grad_sqnorm_{group}"] = self.averages[group].grad_sqnorm
        if self.hessian_every and self.step % self.hessian_every == 0:
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no forward-mode AD (the HVPs)
                proxies = hessian_noise_scale(self.model, sequence_cross_entropy, inputs, targets, num_probes=8,
                                              num_sigma_examples=8,
                                              generator=torch.Generator().manual_seed(self.seed + self.step))
            self.hessian_average.update(proxies.trace_h_sigma, proxies.g_h_g)
            row |= {"b_noise_batch": proxies.b_noise, "b_noise": self.hessian_average.ratio}
        self.row = row
        self.step += 1
        return result.loss


def run_examples(config: dict) -> int:
    """The examples every run of the experiment sees: the reference run's steps at its batch size."""
    return config["reference_steps"] * config["settings"].batch_size


def reference_run(config: dict, corpus, device, run_dir: Path):
    """Train (or reload) the reference run: checkpoints and the per-step noise-scale history."""
    settings = config["settings"]
    examples = run_examples(config)
    marks = [step * settings.batch_size for step in config["checkpoint_steps"]]
    key = {"factory": "noisescale.models:byte_gpt", "model": config["model"], "settings": asdict(settings),
           "examples": examples, "marks": marks, "hessian_every": config["hessian_every"], "seed": 0}
    history_path = run_dir / "reference_history.csv"
    checkpoints = load_checkpoints(run_dir / "reference.pt", key)
    if checkpoints is not None and history_path.exists():
        return checkpoints, pd.read_csv(history_path), None
    torch.manual_seed(0)
    model = byte_gpt(**config["model"]).to(device)
    measure = LayerTypeNoiseScale(model, config["hessian_every"])
    rows = []
    clock = time.process_time()
    checkpoints = train_reference_run(model, corpus, settings, examples=examples, checkpoint_examples=marks, seed=0,
                                      backward=measure, on_step=lambda row: rows.append(row | measure.row))
    seconds = time.process_time() - clock
    measure.norms.close()
    history = pd.DataFrame(rows)
    history["tokens"] = history["examples_seen"] * settings.block_size
    history_path.parent.mkdir(parents=True, exist_ok=True)
    save_csv(history, history_path)
    save_checkpoints(run_dir / "reference.pt", checkpoints, key)
    return checkpoints, history, seconds


def _resolved(b_noise: float) -> float:
    """B_noise, or NaN where the averaged G^T H G estimate is not positive (the ratio is then meaningless)."""
    return b_noise if math.isfinite(b_noise) and b_noise > 0 else math.nan


def side_by_side(table: pd.DataFrame, history: pd.DataFrame, checkpoints) -> pd.DataFrame:
    """The branching B_crit per checkpoint beside the noise scales of the reference run at that step."""
    at = history.set_index("examples_seen")
    b_noise = history[["examples_seen", "b_noise"]].dropna()
    rows = []
    for (_, entry), checkpoint in zip(table.iterrows(), checkpoints):
        mark = int(entry["checkpoint_examples"])
        previous = b_noise[b_noise["examples_seen"] <= mark]
        row = {"checkpoint_step": int(entry["checkpoint_step"]), "tokens": int(entry["tokens"]),
               "validation_loss": checkpoint.validation_loss, "learning_rate": checkpoint.learning_rate,
               "b_crit": int(entry["b_crit"]), "b_crit_low": int(entry["b_crit_low"]),
               "b_crit_high": int(entry["b_crit_high"]), "b_crit_seeds": entry["b_crit_seeds"],
               "b_crit_at_smallest": bool(entry["at_smallest"]), "b_crit_at_largest": bool(entry["at_largest"]),
               "b_simple": float(at.loc[mark, "b_simple_all"]),
               "b_noise": _resolved(float(previous["b_noise"].iloc[-1])) if len(previous) else math.nan}
        for group in LAYER_TYPES:
            column = f"b_simple_{group}"
            row[column] = float(at.loc[mark, column]) if column in at else math.nan
        row["b_crit_over_b_simple"] = row["b_crit"] / row["b_simple"]
        row["b_crit_over_b_noise"] = row["b_crit"] / row["b_noise"]
        rows.append(row)
    return pd.DataFrame(rows)


class OnlineNoiseScalePolicy:
    """The batch size chosen online from the run's own B_simple: per-example norms at every step (the
    ``backward`` of ``train_language_model``), their moving average (decay 0.95, as the reference run's), and
    noisescale's ``NoiseScaleBatchPolicy`` (B = kappa B_simple with kappa 1, at most doubling a step, never
    decreasing; a B_simple not resolved keeps B)."""

    def __init__(self, model: nn.Module, initial: int, minimum: int, maximum: int, decay: float = 0.95):
        self.norms = PerExampleGradNorms(model, sequence_cross_entropy)
        self.average = ExponentialMovingNoiseScale(decay)
        self.policy = NoiseScaleBatchPolicy(initial, min_batch_size=minimum, max_batch_size=maximum)

    def batch_size(self, examples_seen: int) -> int:
        return self.policy.batch_size

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        result = self.norms(inputs, targets)   # p.grad as the plain mean loss's backward leaves it
        if len(result.sqnorms) > 1:   # a last batch cut to one example carries no variance: no estimate
            self.average.update_estimate(simple_noise_scale(result.sqnorms, result.grad_sqnorm))
            self.policy.step(self.average.b_simple)
        return result.loss


WARMUP_ARMS = ("fixed", "fixed_64", "fixed_128", "warmup", "warmup_floor", "adaptive", "adaptive_floor")


def fixed_batch(size: int):
    """The schedule factory of a fixed batch of ``size`` (plain backward)."""
    return lambda model: (size, None)


def online_policy(start: int, maximum: int):
    """The schedule factory of :class:`OnlineNoiseScalePolicy` from ``start`` in [start, maximum]: the policy is
    both the batch-size schedule and the measuring backward."""
    def make(model: nn.Module):
        policy = OnlineNoiseScalePolicy(model, start, start, maximum)
        return policy.batch_size, policy
    return make


def warmup_schedules(config: dict, curve: pd.DataFrame) -> dict:
    """Arm -> a function of the fresh model giving (batch size or its schedule, the measuring backward or None)."""
    settings = config["settings"]
    sizes = config["branch_batch_sizes"]
    marks_b = curve["tokens"] // settings.block_size
    fixed = settings.batch_size   # the reference run's batch
    schedules = {"fixed": fixed_batch(fixed), "fixed_64": fixed_batch(2 * fixed), "fixed_128": fixed_batch(4 * fixed),
                 # B follows the curve, as measured (below B_ref where B_crit is)
                 "warmup": lambda model: (batch_size_warmup(marks_b, curve["b_crit"], minimum=min(sizes),
                                                            maximum=max(sizes)), None),
                 # B follows the curve but never drops below the fixed batch: Merrill et al.'s OLMo recipe
                 "warmup_floor": lambda model: (batch_size_warmup(marks_b, curve["b_crit"], minimum=fixed,
                                                                  maximum=max(sizes)), None),
                 "adaptive": online_policy(min(sizes), max(sizes)), "adaptive_floor": online_policy(fixed, max(sizes))}
    return schedules


def train_arm(config: dict, corpus, device, arm: str, seed: int, make_schedule, lr_factor: float = 1.0) -> list:
    """One run on the experiment's tokens: rows of validation loss at the evaluation marks. The learning rate is
    the reference's warmup + cosine in tokens, times sqrt(B / 32), times ``lr_factor``."""
    settings = config["settings"]
    examples = run_examples(config)
    marks = {round(examples * k / config["evaluations"]) for k in range(1, config["evaluations"] + 1)}
    torch.manual_seed(seed)
    model = byte_gpt(**config["model"]).to(device)
    schedule, backward = make_schedule(model)
    rows = []
    in_force = [0]   # the batch size of the latest step that ``examples`` did not cut short

    def learning_rate(seen: int, size: int) -> float:
        return lr_factor * settings.learning_rate * warmup_cosine(
            seen / examples, settings.warmup_fraction, settings.final_learning_rate_fraction) * math.sqrt(
            size / settings.batch_size)

    def evaluate(row: dict) -> None:
        # every schedule here is non-decreasing: a smaller last batch is the cut one, and the one before is in force
        if row["examples_seen"] < examples or row["batch_size"] >= in_force[0]:
            in_force[0] = row["batch_size"]
        if any(row["examples_seen"] - row["batch_size"] < m <= row["examples_seen"] for m in marks):
            rows.append({"arm": arm, "seed": seed, "lr_factor": lr_factor, "step": row["step"],
                         "examples_seen": row["examples_seen"], "tokens": row["examples_seen"] * settings.block_size,
                         "batch_size": in_force[0], "validation_loss": validation_loss(model, corpus, settings)})

    clock = time.process_time()
    train_language_model(model, settings.optimizer(model), corpus, settings, examples=examples,
                         batch_size=schedule, learning_rate=learning_rate, backward=backward,
                         generator=torch.Generator().manual_seed(1000 + seed), on_step=evaluate)
    rows[-1]["seconds"] = time.process_time() - clock
    if backward is not None:
        backward.norms.close()
    print(f"  {arm} (lr x {lr_factor:g}) seed {seed}: {rows[-1]['step']} steps, validation loss "
          f"{rows[-1]['validation_loss']:.4f}", flush=True)
    return rows


def warmup_runs(config: dict, corpus, device, curve: pd.DataFrame, arms=WARMUP_ARMS) -> pd.DataFrame:
    """Each arm of the module docstring's part 3 on the same tokens, each seed."""
    schedules = warmup_schedules(config, curve)
    return pd.DataFrame([row for seed in config["warmup_seeds"] for arm in arms
                         for row in train_arm(config, corpus, device, arm, seed, schedules[arm])])


TUNED = dict(batch_sizes=(8, 12, 16, 20, 24, 32, 40, 64), lr_factors=(0.5, 1.0, 2.0))


def linear_ramp(start: int, end: int, examples: int):
    """The schedule factory of a batch that grows on a straight line in examples seen, from ``start`` to ``end``
    over the whole run: a hand-made warmup, no measurement (plain backward)."""
    return lambda model: (lambda seen: round(start + (end - start) * seen / examples), None)


def tuned_candidates(config: dict) -> dict:
    """Arm -> schedule factory of ``--tune-lr``: the fixed batches of ``TUNED`` (the strongest simple baseline), the
    online policy from the smallest branch batch (``adaptive``), and ``ramp_E``: a straight line from that batch to
    each E of ``config["ramp_ends"]``, batch growth without measurement, a control for whether the measured shape
    matters at equal tokens and steps."""
    sizes = config["branch_batch_sizes"]
    examples = run_examples(config)
    candidates = {f"fixed_{size}": fixed_batch(size) for size in TUNED["batch_sizes"]}
    candidates |= {f"ramp_{end}": linear_ramp(min(sizes), end, examples) for end in config["ramp_ends"]}
    candidates["adaptive"] = online_policy(min(sizes), max(sizes))
    return candidates


def tuned_runs(config: dict, corpus, device, done: pd.DataFrame | None = None, save=None) -> pd.DataFrame:
    """The learning rate tuned at equal tokens for each arm of :func:`tuned_candidates`. On the first seed: the
    factors of ``TUNED``, the grid widened by a factor of 2 past its edge while the best factor lies on it (at most
    3 times), then the best factor times and divided by sqrt(2); the factor of the lowest final validation loss
    then on every other seed of ``config["tune_seeds"]``. A run (arm, factor, seed) found in ``done`` (rows of an
    earlier call) is taken from it instead of trained again: a run is deterministic on one machine, but another CPU's
    kernels change its last bits, which the online policy's batch choices amplify (to 0.025 in loss and 3 % in steps,
    AMD against Intel), so resume only on the machine that began the search. After each run trained,
    ``save`` (if given) receives this call's rows and the rows of ``done`` not yet taken, so that a killed search
    resumes. Returns the rows of the runs this search visited."""
    done = pd.DataFrame(columns=["arm", "seed", "lr_factor"]) if done is None else done
    runs = []

    def run(arm: str, seed: int, factor: float, make_schedule) -> list:
        nonlocal done
        found = (done["arm"] == arm) & (done["seed"] == seed) & np.isclose(done["lr_factor"], factor, rtol=1e-12)
        if found.any():
            rows, done = done[found].to_dict("records"), done[~found]
        else:
            rows = train_arm(config, corpus, device, arm, seed, make_schedule, factor)
            if save is not None:
                save(pd.concat([done, pd.DataFrame(runs + rows)], ignore_index=True))
        runs.extend(rows)
        return rows

    first, *others = config["tune_seeds"]
    for arm, make_schedule in tuned_candidates(config).items():
        grid = [run(arm, first, factor, make_schedule) for factor in TUNED["lr_factors"]]
        for _ in range(3):
            best = min(grid, key=lambda rows: rows[-1]["validation_loss"])
            factors = sorted(rows[-1]["lr_factor"] for rows in grid)
            edge = best[-1]["lr_factor"]
            if edge not in (factors[0], factors[-1]):
                break
            grid.append(run(arm, first, edge * 2 if edge == factors[-1] else edge / 2, make_schedule))
        coarse = min(grid, key=lambda rows: rows[-1]["validation_loss"])[-1]["lr_factor"]
        grid += [run(arm, first, coarse * step, make_schedule) for step in (math.sqrt(0.5), math.sqrt(2))]
        best = min(grid, key=lambda rows: rows[-1]["validation_loss"])[-1]["lr_factor"]
        for seed in others:
            run(arm, seed, best, make_schedule)
    return pd.DataFrame(runs)


def save_csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` to ``path`` atomically: a killed run leaves the previous file."""
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False)


def over_seeds(final: pd.DataFrame) -> dict:
    """Final rows of one arm, one per seed: the seed count, and mean and standard error of steps and loss."""
    n = len(final)
    return {"seeds": n, "steps_mean": final["step"].mean(), "steps_stderr": final["step"].std(ddof=1) / math.sqrt(n),
            "validation_loss_mean": final["validation_loss"].mean(),
            "validation_loss_stderr": final["validation_loss"].std(ddof=1) / math.sqrt(n)}


def tuned_summary(grid: pd.DataFrame) -> pd.DataFrame:
    """Per arm, its tuned learning-rate factor (the one run on every seed): steps and final validation loss, mean
    and standard error over seeds, the first seed's losses at every factor tried, and whether the tuned factor is
    still on the edge of the factors tried."""
    final = grid.sort_values("examples_seen").groupby(["arm", "lr_factor", "seed"]).tail(1)
    tuned = final.groupby(["arm", "lr_factor"]).filter(lambda group: len(group) == final["seed"].nunique())
    rows = []
    for (arm, factor), group in tuned.groupby(["arm", "lr_factor"], sort=False):
        tried = final[(final["arm"] == arm) & (final["seed"] == final["seed"].min())].sort_values("lr_factor")
        rows.append({"arm": arm, "lr_factor": factor, **over_seeds(group),
                     "first_seed_by_factor": " ".join(f"{f:g}:{v:.4f}" for f, v in zip(tried["lr_factor"],
                                                                                     tried["validation_loss"])),
                     "at_edge": factor in (tried["lr_factor"].min(), tried["lr_factor"].max())})
    order = {arm: k for k, arm in enumerate(sorted(tuned["arm"].unique(), key=lambda arm: (
        arm == "adaptive", arm.startswith("ramp_"), int(arm.split("_")[1]) if "_" in arm else 0)))}
    summary = pd.DataFrame(rows).sort_values("arm", key=lambda arms: arms.map(order))
    for kind in ("fixed", "ramp"):
        summary[f"{kind}_steps_at_this_loss"] = front_steps(summary, summary["validation_loss_mean"], kind)
    return summary


def front_steps(summary: pd.DataFrame, losses, kind: str = "fixed") -> np.ndarray:
    """The steps the front of the tuned arms ``kind``_* (fixed batches, or ramps) needs for each of ``losses``:
    linear between those arms' (mean final loss, mean steps), each a run of its own length with its own schedule,
    leaving out an arm that another reaches a lower loss than in fewer steps; NaN outside the front."""
    arms = summary[summary["arm"].str.startswith(f"{kind}_")].sort_values("steps_mean")
    front = arms[arms["validation_loss_mean"] < arms["validation_loss_mean"].cummin().shift(1, fill_value=np.inf)]
    return np.interp(losses, front["validation_loss_mean"][::-1], front["steps_mean"][::-1], left=np.nan,
                     right=np.nan)


def warmup_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Per arm: optimizer steps and final validation loss, mean and standard error over seeds; against the fixed
    arm: the relative step reduction, the loss difference with its standard error (independent arms), and whether
    the issue's target holds (>= 40 % fewer steps, loss no worse than one standard error)."""
    final = curves.sort_values("examples_seen").groupby(["arm", "seed"]).tail(1)
    final = final.sort_values("arm", key=lambda arms: arms.map(
        lambda arm: WARMUP_ARMS.index(arm) if arm in WARMUP_ARMS else len(WARMUP_ARMS)), kind="stable")
    rows = []
    for arm, group in final.groupby("arm", sort=False):
        stats = over_seeds(group)
        rows.append({"arm": arm, "seeds": stats.pop("seeds"), "tokens": int(group["tokens"].iloc[0]), **stats})
    frame = pd.DataFrame(rows).set_index("arm")
    fixed = frame.loc["fixed"]
    frame["step_reduction"] = 1 - frame["steps_mean"] / fixed["steps_mean"]
    frame["loss_gap"] = frame["validation_loss_mean"] - fixed["validation_loss_mean"]
    frame["loss_gap_stderr"] = np.hypot(frame["validation_loss_stderr"], fixed["validation_loss_stderr"])
    frame["target_met"] = (frame["step_reduction"] >= 0.4) & (frame["loss_gap"] <= frame["loss_gap_stderr"])
    frame.loc["fixed", ["loss_gap_stderr", "target_met"]] = [math.nan, False]
    return frame.reset_index()


# ---------------------------------------------------------------------------------------------- figures
def plot_noise_scale_and_branching(history: pd.DataFrame, table: pd.DataFrame, branches: pd.DataFrame,
                                   unigram: float, tolerance: float):
    """Four panels: losses over tokens; B_crit by branching against B_simple, B_noise and the normalisation-only
    B_simple; B_simple per layer type; the branches' relative loss against B with the tolerance."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    smooth = history["loss"].rolling(20, min_periods=1).mean()
    ax.plot(history["tokens"], smooth, label="training loss (20-step mean)")
    ax.plot(table["tokens"], table["validation_loss"], "o-", label="validation loss at the checkpoints")
    ax.axhline(unigram, color="grey", ls="--", label=f"unigram baseline {unigram:.2f}")
    ax.set(xlabel="tokens", ylabel="nats / byte", title="reference run (AdamW, B = 32)")
    ax.legend()
    ax = axes[0, 1]
    lower = table["b_crit"] - table["b_crit_low"]
    upper = table["b_crit_high"] - table["b_crit"]
    ax.errorbar(table["tokens"], table["b_crit"], yerr=[lower, upper], fmt="s-", color="black", capsize=4,
                label="B_crit by branching (range over seeds)")
    censored = table[table["b_crit_at_largest"]]
    ax.plot(censored["tokens"], censored["b_crit"], "^", color="black", ms=11, mfc="none",
            label="lower bound (largest B passed)")
    censored = table[table["b_crit_at_smallest"]]
    ax.plot(censored["tokens"], censored["b_crit"], "v", color="black", ms=11, mfc="none",
            label="upper bound (2 B_0 failed)")
    ax.plot(history["tokens"], history["b_simple_all"], label="B_simple (all parameters)")
    ax.plot(history["tokens"], history["b_simple_normalisation"], label="B_simple (normalisation layers only)")
    noise = history.dropna(subset=["b_noise"])
    noise = noise[np.isfinite(noise["b_noise"]) & (noise["b_noise"] > 0)]
    ax.plot(noise["tokens"], noise["b_noise"], "o-", label="B_noise")
    ax.set(xlabel="tokens", ylabel="batch size (sequences of 64 bytes)", yscale="log",
           title="critical batch size and noise scale over training")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for group in LAYER_TYPES:
        if f"b_simple_{group}" in history:
            ax.plot(history["tokens"], history[f"b_simple_{group}"], label=group)
    ax.plot(history["tokens"], history["b_simple_all"], color="black", lw=1, label="all")
    ax.set(xlabel="tokens", ylabel="B_simple", yscale="log", title="B_simple per layer type (Gray et al. 2024)")
    ax.legend()
    ax = axes[1, 1]
    mean = branches.groupby(["checkpoint_step", "batch_size"])["loss"].mean().reset_index()
    for step, group in mean.groupby("checkpoint_step"):
        reference = group.sort_values("batch_size")["loss"].iloc[0]
        ax.plot(group["batch_size"], group["loss"] / reference - 1, "o-", label=f"checkpoint at step {step}")
    ax.axhline(tolerance, color="grey", ls="--", label=f"tolerance {tolerance:.0%}")
    ax.set(xscale="log", xlabel="branch batch size B (lr sqrt-scaled, equal tokens)",
           ylabel="loss / loss(smallest B) - 1", title="branches (mean over seeds)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_warmup(curves: pd.DataFrame):
    """Validation loss against optimizer steps and tokens, and the batch size, of each arm (every seed)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"fixed": "tab:blue", "fixed_64": "tab:cyan", "fixed_128": "tab:gray", "warmup": "tab:orange",
               "warmup_floor": "tab:green", "adaptive": "tab:red", "adaptive_floor": "tab:purple"}
    for (arm, seed), group in curves.groupby(["arm", "seed"]):
        label = arm if seed == curves["seed"].min() else None
        axes[0].plot(group["step"], group["validation_loss"], "o-", color=colours.get(arm), alpha=0.7, label=label)
        axes[1].plot(group["tokens"], group["validation_loss"], "o-", color=colours.get(arm), alpha=0.7, label=label)
        axes[2].step(group["tokens"], group["batch_size"], where="post", color=colours.get(arm), label=label)
    axes[0].set(xlabel="optimizer steps", ylabel="validation loss (nats / byte)", title="loss per step")
    axes[1].set(xlabel="tokens", ylabel="validation loss (nats / byte)", title="loss per token")
    axes[2].set(xlabel="tokens", ylabel="batch size at the evaluation", yscale="log", title="batch size")
    for ax in axes:
        ax.legend()
    figure.tight_layout()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version, written to runs/")
    parser.add_argument("--arms", nargs="+", choices=WARMUP_ARMS, default=list(WARMUP_ARMS),
                        help="warmup arms to run; the others' rows are kept from the existing warmup_curves.csv")
    parser.add_argument("--tune-lr", action="store_true",
                        help="only the fixed batch sizes, the ramps and the online policy with their learning rate "
                             "tuned (data/lm/tuned_lr*.csv); nothing else is run or written")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = experiment(args.quick)
    out = ROOT / "runs" / "language_model_quick" if args.quick else OUT
    run_dir = ROOT / "runs" / ("language_model_quick" if args.quick else "language_model")
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    corpus = load_shipped_corpus()
    unigram = unigram_cross_entropy(corpus.train, corpus.validation)
    print(f"corpus: {len(corpus.train)} training and {len(corpus.validation)} validation bytes; unigram baseline "
          f"{unigram:.4f} nats/byte", flush=True)

    if args.tune_lr:
        curves_path = out / "tuned_lr_curves.csv"
        grid = tuned_runs(config, corpus, device, pd.read_csv(curves_path) if curves_path.exists() else None,
                          save=partial(save_csv, path=curves_path))
        save_csv(grid, curves_path)
        tuned = tuned_summary(grid)
        save_csv(tuned, out / "tuned_lr.csv")
        print(tuned.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return

    checkpoints, history, reference_seconds = reference_run(config, corpus, device, run_dir)
    save_csv(history, out / "reference_history.csv")
    print(f"reference run: final validation loss {checkpoints[-1].validation_loss:.4f} nats/byte "
          f"({'reloaded' if reference_seconds is None else f'{reference_seconds:.0f} s CPU'})", flush=True)

    factory = partial(byte_gpt, **config["model"])
    clock = time.process_time()
    branches = run_branches(out / "branches.csv", factory, checkpoints[:-1], corpus, config["settings"],
                            batch_sizes=config["branch_batch_sizes"], branch_examples=config["branch_examples"],
                            seeds=config["branch_seeds"], device=device, progress=False)
    branch_seconds = time.process_time() - clock
    table = side_by_side(critical_batch_sizes(branches, config["tolerance"]), history, checkpoints)
    save_csv(table, out / "critical_batch_size.csv")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)

    clock = time.process_time()
    curves = warmup_runs(config, corpus, device, table, args.arms)
    warmup_seconds = time.process_time() - clock
    if set(args.arms) != set(WARMUP_ARMS) and (out / "warmup_curves.csv").exists():
        kept = pd.read_csv(out / "warmup_curves.csv")
        curves = pd.concat([kept[~kept["arm"].isin(args.arms)], curves], ignore_index=True)
    save_csv(curves, out / "warmup_curves.csv")
    summary = warmup_summary(curves)
    save_csv(summary, out / "warmup_summary.csv")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    result = {
        "corpus": corpus.source, "train_bytes": len(corpus.train), "validation_bytes": len(corpus.validation),
        "unigram_nats_per_byte": unigram, "reference_final_validation_loss": checkpoints[-1].validation_loss,
        "model": config["model"], "parameters": sum(p.numel() for p in factory().parameters()),
        "settings": asdict(config["settings"]), "reference_steps": config["reference_steps"],
        "branch_batch_sizes": list(config["branch_batch_sizes"]), "branch_examples": config["branch_examples"],
        "branch_seeds": list(config["branch_seeds"]), "tolerance": config["tolerance"],
        "warmup": {row.arm: {"step_reduction": row.step_reduction, "loss_gap": row.loss_gap,
                             "loss_gap_stderr": row.loss_gap_stderr, "target_met": bool(row.target_met)}
                   for row in summary.itertuples() if row.arm != "fixed"},
        "target_met": bool(summary["target_met"].any()),
        "cpu_seconds": {"reference_run": reference_seconds, "branches_this_invocation": branch_seconds,
                        "warmup_runs": warmup_seconds, "total_this_invocation": time.process_time() - cpu},
        "wall_seconds_this_invocation": time.perf_counter() - wall, "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_write(out / "summary.json") as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    figure = plot_noise_scale_and_branching(history, table, branches, unigram, config["tolerance"])
    figure.savefig(out / "noise_scale_vs_branching.png", dpi=110)
    plot_warmup(curves).savefig(out / "warmup.png", dpi=110)
    for row in summary.itertuples():
        if row.arm != "fixed":
            print(f"{row.arm}: {row.step_reduction:.1%} fewer optimizer steps, validation loss {row.loss_gap:+.4f} "
                  f"+- {row.loss_gap_stderr:.4f} (SE) against the fixed batch; target (>= 40 % fewer steps, loss "
                  f"within one SE) {'met' if row.target_met else 'not met'}")
    print(json.dumps(result["cpu_seconds"]), f"wall {result['wall_seconds_this_invocation']:.0f} s")


if __name__ == "__main__":
    main()
