"""The critical batch size measured directly by branching (Merrill et al. 2025, "Critical Batch Size Revisited").

A reference run trains a byte-level language model with AdamW, a linear learning-rate warmup and a cosine decay
(:func:`train_reference_run`), and keeps checkpoints (model and optimizer state) at chosen points. From each
checkpoint c, short *branches* continue training at batch sizes B_0 2^k, k = 0, 1, ..., each over the same number
of examples D (D x block_size tokens), at the constant learning rate

    eta(B) = eta_c * r(B / B_ref),   r = sqrt (default, for Adam), linear or none,

where eta_c is the reference run's learning rate at c and B_ref its batch size (:func:`branch_loss`); the
optimizer state is carried over. The branch's result is its validation loss L(c, B, s) after D examples (seed s
draws its batches). Every branch takes D / B whole steps of its batch size (:func:`check_branch_plan`): at least two
strictly increasing batch sizes, each dividing D, are required, since a branch with B > D took one step of D
examples and one with D not a multiple of B ended on a partial step, i.e. trained at another batch size, and
B_crit was then reported for batch sizes that were never trained.

Selection (:func:`select_critical_batch_size`): the reference loss is that of the smallest-batch branch,
L_0 = L(c, B_0, s) (the most optimizer steps for the same tokens); B_crit is the largest tried B such that every
tried B' <= B has L(c, B', s) <= L_0 (1 + tolerance). If even 2 B_0 fails, B_crit = B_0 is an upper bound
(``at_smallest``); if the largest tried B passes, B_crit is a lower bound (``at_largest``). Its uncertainty comes
from seeds (:func:`critical_batch_sizes`): B_crit of the seed-averaged losses, with the range of the per-seed
values.

:func:`run_branches` is resumable like the sweep: one CSV row per (checkpoint, batch size, seed), the whole file
rewritten atomically (temporary file + ``os.replace``) after each branch; on a rerun the finished rows are kept,
a damaged row (non-finite loss, wrong step count) is trained again, and rows of other settings are an error.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from noisescale._checks import check_int
from noisescale._modes import eval_mode
from noisescale.controller import couple_learning_rate
from noisescale.models import sequence_cross_entropy
from noisescale.text import ByteCorpus

__all__ = [
    "LanguageModelSettings",
    "Checkpoint",
    "CriticalBatchSize",
    "warmup_cosine",
    "validation_loss",
    "train_language_model",
    "train_reference_run",
    "save_checkpoints",
    "load_checkpoints",
    "saved_config",
    "branch_loss",
    "run_branches",
    "check_branch_plan",
    "read_branch_results",
    "select_critical_batch_size",
    "critical_batch_sizes",
    "batch_size_warmup",
    "BRANCH_RULES",
]

BRANCH_RULES = ("sqrt", "linear", "none")


@dataclass(frozen=True)
class LanguageModelSettings:
    """How a byte-level language model trains: AdamW (betas, weight decay), gradient clipping, warmup + cosine.

    ``batch_size`` is the reference run's B_ref (sequences of ``block_size`` tokens) and ``learning_rate`` its
    peak; the schedule is :func:`warmup_cosine` over the run's examples. ``validation_windows`` non-overlapping
    windows of the validation part measure the loss.
    """

    block_size: int = 64
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    final_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad_norm: float = 1.0
    validation_windows: int = 256

    def __post_init__(self) -> None:
        check_int(self.block_size, "block_size", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.validation_windows, "validation_windows", 1)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.final_learning_rate_fraction <= 1:
            raise ValueError("warmup_fraction must lie in [0, 1) and final_learning_rate_fraction in [0, 1]")

    def optimizer(self, model: nn.Module) -> torch.optim.AdamW:
        """AdamW over the model's trainable parameters (weight decay on matrices only, as in nanoGPT)."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.learning_rate, betas=(self.beta1, self.beta2))


def warmup_cosine(progress: float, warmup_fraction: float, final_fraction: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run: linear from 0 to 1 over ``warmup_fraction``,
    then cosine down to ``final_fraction`` at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return progress / warmup_fraction
    decay = (progress - warmup_fraction) / (1.0 - warmup_fraction)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * decay))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def validation_loss(model: nn.Module, corpus: ByteCorpus, settings: LanguageModelSettings,
                    evaluation_batch: int = 64) -> float:
    """Mean next-byte cross-entropy (nats/byte) over the first ``settings.validation_windows`` validation windows."""
    inputs, targets = corpus.validation_windows(settings.block_size, settings.validation_windows)
    device = _device_of(model)
    total = 0.0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(inputs), evaluation_batch):
            x, y = inputs[start:start + evaluation_batch].to(device), targets[start:start + evaluation_batch].to(device)
            total += float(sequence_cross_entropy(model(x), y).sum())
    return total / len(inputs)


def _plain_backward(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def backward(inputs: Tensor, targets: Tensor) -> Tensor:
        loss = sequence_cross_entropy(model(inputs), targets).mean()
        loss.backward()
        return loss.detach()
    return backward


def train_language_model(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: ByteCorpus,
    settings: LanguageModelSettings,
    *,
    examples: int,
    batch_size: int | Callable[[int], int],
    learning_rate: Callable[[int, int], float],
    generator: torch.Generator,
    backward: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Train on ``examples`` random training windows; returns the number of optimizer steps.

    Before each step the batch size is ``batch_size(examples_seen)`` (or the constant), cut so that exactly
    ``examples`` are seen, and every parameter group's learning rate is ``learning_rate(examples_seen, B)``.
    ``backward(inputs, targets)`` runs forward and backward into p.grad and returns the mean loss (default: plain
    mean token cross-entropy; the experiment passes the per-example-norm measurement here). Gradients are then
    clipped to ``settings.clip_grad_norm`` (not 0) and the optimizer steps. ``on_step`` receives one dict per step.
    """
    check_int(examples, "examples", 1)
    device = _device_of(model)
    backward = backward or _plain_backward(model)
    model.train()
    seen = step = 0
    while seen < examples:
        size = batch_size(seen) if callable(batch_size) else batch_size
        size = min(check_int(size, "batch_size", 1), examples - seen)
        rate = learning_rate(seen, size)
        for group in optimizer.param_groups:
            group["lr"] = rate
        inputs, targets = corpus.sample_batch(size, settings.block_size, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = backward(inputs.to(device), targets.to(device))
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"step {step}: the training loss is {float(loss)}; lower the learning rate")
        if settings.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
        optimizer.step()
        seen += size
        step += 1
        if on_step is not None:
            on_step({"step": step, "examples_seen": seen, "batch_size": size, "learning_rate": rate,
                     "loss": float(loss)})
    return step


@dataclass
class Checkpoint:
    """The reference run's state after ``examples_seen`` examples (``step`` steps) at learning rate
    ``learning_rate`` and batch size ``batch_size``: what a branch starts from."""

    examples_seen: int
    step: int
    learning_rate: float
    batch_size: int
    validation_loss: float
    model_state: dict[str, Tensor] = field(repr=False)
    optimizer_state: dict[str, Any] = field(repr=False)


def train_reference_run(
    model: nn.Module,
    corpus: ByteCorpus,
    settings: LanguageModelSettings,
    *,
    examples: int,
    checkpoint_examples: Sequence[int],
    seed: int = 0,
    backward: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> list[Checkpoint]:
    """Train ``model`` (in place) for ``examples`` windows at the constant batch ``settings.batch_size`` with AdamW
    and :func:`warmup_cosine`; return a :class:`Checkpoint` (with its validation loss) at each of
    ``checkpoint_examples`` (multiples of the batch size, at most ``examples``) and at the end."""
    check_int(examples, "examples", 1)
    marks = sorted({check_int(mark, "checkpoint_examples", 1) for mark in checkpoint_examples} | {examples})
    if marks[-1] > examples or any(mark % settings.batch_size for mark in marks[:-1]):
        raise ValueError(f"checkpoint_examples must be multiples of the batch size {settings.batch_size} and at most "
                         f"examples={examples}, got {list(checkpoint_examples)}")
    corpus.check_block_size(settings.block_size)
    optimizer = settings.optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    checkpoints: list[Checkpoint] = []

    def learning_rate(seen: int, size: int) -> float:
        return settings.learning_rate * warmup_cosine(seen / examples, settings.warmup_fraction,
                                                       settings.final_learning_rate_fraction)

    def record(row: dict[str, Any]) -> None:
        if on_step is not None:
            on_step(row)
        if row["examples_seen"] in marks:
            checkpoints.append(Checkpoint(
                examples_seen=row["examples_seen"], step=row["step"],
                learning_rate=learning_rate(row["examples_seen"], settings.batch_size),
                batch_size=settings.batch_size, validation_loss=validation_loss(model, corpus, settings),
                model_state=copy.deepcopy(model.state_dict()), optimizer_state=copy.deepcopy(optimizer.state_dict())))

    train_language_model(model, optimizer, corpus, settings, examples=examples, batch_size=settings.batch_size,
                         learning_rate=learning_rate, generator=generator, backward=backward, on_step=record)
    return checkpoints


def _atomic_save(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoints(path: str | os.PathLike[str], checkpoints: Sequence[Checkpoint], config: dict[str, Any]) -> None:
    """Write the checkpoints and the ``config`` that produced them to one file, atomically."""
    payload = {"config": config, "checkpoints": [asdict(checkpoint) for checkpoint in checkpoints]}
    _atomic_save(Path(path), lambda temporary: torch.save(payload, temporary))


def _saved_payload(path: Path) -> dict[str, Any] | None:
    """What ``save_checkpoints`` wrote at ``path``; None if there is no such file or it cannot be read (damaged).
    weights_only: a file in the output folder runs no code when loaded (the checkpoints need none)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return payload if isinstance(payload, dict) and "config" in payload else None


def saved_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config of the checkpoints saved at ``path``; None if there are none or the file is damaged."""
    payload = _saved_payload(Path(path))
    return None if payload is None else payload["config"]


def load_checkpoints(path: str | os.PathLike[str], config: dict[str, Any]) -> list[Checkpoint] | None:
    """The checkpoints saved at ``path`` if they were made with ``config``; None if there are none, the file is
    damaged or they are of another config (``saved_config`` tells which)."""
    payload = _saved_payload(Path(path))
    if payload is None or payload["config"] != config:
        return None
    return [Checkpoint(**entry) for entry in payload["checkpoints"]]


def branch_loss(
    model_factory: Callable[[], nn.Module],
    checkpoint: Checkpoint,
    corpus: ByteCorpus,
    settings: LanguageModelSettings,
    *,
    batch_size: int,
    examples: int,
    rule: str = "sqrt",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """Continue from ``checkpoint`` for ``examples`` windows at ``batch_size`` and the constant learning rate
    eta_c r(B / B_ref) (module docstring); return (validation loss afterwards, optimizer steps).

    ``examples`` must be a multiple of ``batch_size``: every step is a whole batch of that size."""
    check_int(examples, "examples", 1)
    if examples % check_int(batch_size, "batch_size", 1):
        raise ValueError(f"examples={examples} is not a multiple of batch_size={batch_size}: the branch would end on "
                         "a partial step of another batch size")
    if rule not in BRANCH_RULES:
        raise ValueError(f"rule must be one of {BRANCH_RULES}, got {rule!r}")
    model = model_factory().to(device)
    model.load_state_dict(checkpoint.model_state)
    optimizer = settings.optimizer(model)
    optimizer.load_state_dict(copy.deepcopy(checkpoint.optimizer_state))  # load_state_dict would share its tensors
    rate = couple_learning_rate(checkpoint.learning_rate, checkpoint.batch_size, check_int(batch_size, "batch_size", 1),
                                rule)
    generator = torch.Generator().manual_seed(seed)
    steps = train_language_model(model, optimizer, corpus, settings, examples=examples, batch_size=batch_size,
                                 learning_rate=lambda seen, size: rate, generator=generator)
    return validation_loss(model, corpus, settings), steps


BRANCH_KEY = ("checkpoint_examples", "batch_size", "seed")
BRANCH_SETTING_COLUMNS = ("branch_examples", "rule", "reference_batch_size", "block_size", "checkpoint_learning_rate")


def read_branch_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The branch CSV, sorted by checkpoint, batch size and seed."""
    frame = pd.read_csv(path)
    missing = [c for c in (*BRANCH_KEY, *BRANCH_SETTING_COLUMNS, "loss", "steps") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a branch result file, missing column(s) {missing}")
    return frame.sort_values(list(BRANCH_KEY), kind="stable").reset_index(drop=True)


def check_branch_plan(batch_sizes: Sequence[int], branch_examples: int) -> list[int]:
    """``batch_sizes`` as a list of ints once the plan measures what it reports: at least 2 batch sizes (B_crit
    compares each branch with the smallest one's loss), strictly increasing (no repeats), each dividing
    ``branch_examples`` (every branch takes whole steps of its own batch size over the same data; a batch size
    above ``branch_examples`` took one step of ``branch_examples`` examples, and a remainder ended on a partial
    step, i.e. at another batch size). Raises ValueError naming what to give instead."""
    sizes = [check_int(size, "batch_sizes", 1) for size in batch_sizes]
    check_int(branch_examples, "branch_examples", 1)
    if len(sizes) < 2:
        raise ValueError(f"batch_sizes {sizes} has {len(sizes)} batch size(s); B_crit compares the branches with the "
                         "smallest one's loss, so at least 2 are needed (e.g. B_0, 2 B_0, 4 B_0)")
    if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        raise ValueError(f"batch_sizes must be strictly increasing without repeats, got {sizes}")
    too_large = [size for size in sizes if size > branch_examples]
    if too_large:
        raise ValueError(f"batch size(s) {too_large} exceed branch_examples={branch_examples}: such a branch cannot "
                         f"take one whole step (it would train on {branch_examples} examples, another batch size); "
                         f"give branch_examples >= {sizes[-1]} (a multiple of {math.lcm(*sizes)}) or drop them")
    uneven = [size for size in sizes if branch_examples % size]
    if uneven:
        whole = math.lcm(*sizes)
        lower = branch_examples // whole * whole
        suggestion = f"{lower} or {lower + whole}" if lower else f"{whole}"
        raise ValueError(f"branch_examples={branch_examples} is not a multiple of batch size(s) {uneven}: their "
                         "last step would be a partial batch, so those branches would not train at their batch size; "
                         f"give a multiple of {whole} (every batch size divides it), e.g. {suggestion}")
    return sizes


def _expected_steps(examples: int, batch_size: int) -> int:
    return -(-examples // batch_size)


def _valid_rows(path: Path, settings_of: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """The finished rows of an earlier run: rows of another setting are an error; damaged rows are dropped (and
    trained again); rows of checkpoints this run does not have are kept."""
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    frame = read_branch_results(path)
    for mark, expected in settings_of.items():
        rows = frame[frame["checkpoint_examples"] == mark]
        for name, value in expected.items():
            if isinstance(value, float):
                differs = ~np.isclose(pd.to_numeric(rows[name], errors="coerce"), value, rtol=1e-12, atol=0)
            else:
                differs = rows[name].astype(type(value)) != value
            differing = rows[np.asarray(differs, dtype=bool)]
            if len(differing):
                raise ValueError(f"{path}: holds branches of other settings ({name} = {differing[name].iloc[0]!r} "
                                 f"at checkpoint {mark}, this run has {value!r}); write to another file or use the "
                                 "same settings")
    loss = pd.to_numeric(frame["loss"], errors="coerce")
    steps = pd.to_numeric(frame["steps"], errors="coerce")
    expected = [_expected_steps(int(e), int(b)) for e, b in zip(frame["branch_examples"], frame["batch_size"])]
    valid = np.isfinite(loss) & (loss > 0) & (steps == expected)
    return frame[valid].drop_duplicates(list(BRANCH_KEY), keep="last")


def run_branches(
    path: str | os.PathLike[str],
    model_factory: Callable[[], nn.Module],
    checkpoints: Sequence[Checkpoint],
    corpus: ByteCorpus,
    settings: LanguageModelSettings,
    *,
    batch_sizes: Sequence[int],
    branch_examples: int,
    seeds: Sequence[int] = (0, 1),
    rule: str = "sqrt",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Every (checkpoint, batch size, seed) branch not yet in the CSV at ``path`` (module docstring); return all.

    The plan is checked before anything is trained (:func:`check_branch_plan`).

    Each branch is seeded by its seed alone, so a result does not depend on the order or on resuming.
    """
    from tqdm.auto import tqdm

    batch_sizes = check_branch_plan(batch_sizes, branch_examples)
    if rule not in BRANCH_RULES:
        raise ValueError(f"rule must be one of {BRANCH_RULES}, got {rule!r}")
    if not checkpoints:
        raise ValueError("run_branches needs at least one checkpoint")
    path = Path(path)
    settings_of = {c.examples_seen: {"branch_examples": branch_examples, "rule": rule,
                                     "reference_batch_size": c.batch_size, "block_size": settings.block_size,
                                     "checkpoint_learning_rate": c.learning_rate} for c in checkpoints}
    frame = _valid_rows(path, settings_of)
    done = set() if frame.empty else {tuple(int(v) for v in key) for key in frame[list(BRANCH_KEY)].to_numpy()}
    todo = [(c, b, s) for c in checkpoints for b in batch_sizes for s in seeds if (c.examples_seen, b, s) not in done]
    rows = [] if frame.empty else frame.to_dict("records")
    for checkpoint, size, seed in tqdm(todo, desc="branches", disable=not progress):
        loss, steps = branch_loss(model_factory, checkpoint, corpus, settings, batch_size=size,
                                  examples=branch_examples, rule=rule, seed=seed, device=device)
        rows.append({"checkpoint_examples": checkpoint.examples_seen, "batch_size": size, "seed": seed,
                     "checkpoint_step": checkpoint.step, "tokens": checkpoint.examples_seen * settings.block_size,
                     "learning_rate": couple_learning_rate(checkpoint.learning_rate, checkpoint.batch_size, size, rule),
                     "loss": loss, "steps": steps, **settings_of[checkpoint.examples_seen]})
        result = pd.DataFrame(rows)
        _atomic_save(path, lambda temporary: result.to_csv(temporary, index=False))
    if not rows:
        raise ValueError("no branch was run")  # unreachable with checkpoints, batch sizes and seeds given
    return read_branch_results(path)


@dataclass(frozen=True)
class CriticalBatchSize:
    """B_crit of one set of branches; ``at_smallest``: B_crit <= value (even 2 B_0 failed); ``at_largest``:
    B_crit >= value (the largest tried batch passed)."""

    value: int
    at_smallest: bool
    at_largest: bool


def select_critical_batch_size(batch_sizes: Sequence[int], losses: Sequence[float],
                               tolerance: float) -> CriticalBatchSize:
    """The largest B such that every tried B' <= B has loss <= L_0 (1 + tolerance), L_0 the smallest batch's loss.

    ``losses`` must be finite; ``tolerance`` >= 0 is relative (0.01: within 1 % of L_0). At least 2 batch sizes:
    with one there is nothing to compare (it was reported as B_crit >= that batch size).
    """
    if len(batch_sizes) != len(losses) or len(batch_sizes) < 2:
        raise ValueError(f"batch_sizes and losses need the same length, at least 2 (one batch size compares "
                         f"nothing), got {len(batch_sizes)} and {len(losses)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    order = np.argsort(batch_sizes, kind="stable")
    sizes, values = np.asarray(batch_sizes)[order], np.asarray(losses, dtype=float)[order]
    if not np.all(np.isfinite(values)):
        raise ValueError(f"losses must be finite, got {values.tolist()}")
    within = values <= values[0] * (1.0 + tolerance)
    last = len(within) if within.all() else int(np.argmin(within))  # index of the first failure
    return CriticalBatchSize(int(sizes[last - 1]), at_smallest=last == 1,
                             at_largest=last == len(sizes))


def critical_batch_sizes(frame: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """One row per checkpoint: B_crit of the seed-mean losses (``b_crit``, with its censoring flags), the per-seed
    values (``b_crit_seeds``) and their range (``b_crit_low``, ``b_crit_high``), and the branches' losses."""
    rows = []
    for mark, group in frame.groupby("checkpoint_examples", sort=True):
        mean = group.groupby("batch_size")["loss"].mean()
        overall = select_critical_batch_size(mean.index.tolist(), mean.tolist(), tolerance)
        per_seed = [select_critical_batch_size(g["batch_size"].tolist(), g["loss"].tolist(), tolerance).value
                    for _, g in group.groupby("seed")]
        rows.append({"checkpoint_examples": int(mark), "checkpoint_step": int(group["checkpoint_step"].iloc[0]),
                     "tokens": int(group["tokens"].iloc[0]), "b_crit": overall.value,
                     "at_smallest": overall.at_smallest, "at_largest": overall.at_largest,
                     "b_crit_low": min(per_seed), "b_crit_high": max(per_seed),
                     "b_crit_seeds": " ".join(str(v) for v in per_seed), "seeds": len(per_seed),
                     "tolerance": tolerance,
                     **{f"loss_b{int(b)}": float(v) for b, v in mean.items()}})
    return pd.DataFrame(rows)


def batch_size_warmup(checkpoint_examples: Sequence[int], b_crit: Sequence[float], *, minimum: int,
                      maximum: int) -> Callable[[int], int]:
    """A batch-size schedule from a measured B_crit curve: at ``examples_seen`` the B_crit of the latest
    checkpoint at or before it (``minimum`` before the first), rounded down to a power of two and clipped to
    [minimum, maximum]. Never decreases when the curve is non-decreasing (Merrill et al.'s batch-size warmup)."""
    check_int(minimum, "minimum", 1)
    check_int(maximum, "maximum", minimum)
    if len(checkpoint_examples) != len(b_crit):
        raise ValueError("checkpoint_examples and b_crit need the same length")
    marks = np.asarray(checkpoint_examples)
    order = np.argsort(marks, kind="stable")
    marks, values = marks[order], np.asarray(b_crit, dtype=float)[order]

    def batch_size(examples_seen: int) -> int:
        index = np.searchsorted(marks, examples_seen, side="right") - 1
        if index < 0:
            return minimum
        value = max(float(values[index]), 1.0)
        return int(min(max(2 ** math.floor(math.log2(value)), minimum), maximum))

    return batch_size
