"""A batch sampler whose batch size can change between batches, for ``DataLoader(dataset, batch_sampler=...)``.

Adaptive-batch training (Smith et al. 2017, "Don't decay the learning rate, increase the batch size";
McCandlish et al. 2018) changes the batch size during an epoch, which ``torch.utils.data.BatchSampler``
cannot do. :class:`ResizableBatchSampler` reads its batch size afresh for every batch it yields.

Epochs are counted in examples. The sampler walks one endless stream of indices, the concatenation of one
permutation of ``range(num_examples)`` per epoch (epoch ``e`` shuffled by a ``torch.Generator`` seeded with
``seed + e``, reordered only at its start as described under "Epoch boundary"), and every global batch
is the next ``batch_size`` indices of that stream. Each example therefore appears exactly once in every
epoch's stretch of the stream whatever the batch size does, every batch has exactly the requested size,
and ``epoch = examples_seen / num_examples`` is the fractional epoch that
:class:`noisescale.controller.BatchSizeSchedule` takes.

Epoch boundary: the batch that crosses the end of an epoch is topped up by *borrowing* from the next epoch
(it is never short and nothing is padded). It takes the first indices of the next epoch's permutation that
are not already in its own part from the current epoch, so no batch holds an example twice; the borrowed
indices then open the next epoch, followed by the rest of that permutation in order. One ``iter(sampler)``
pass yields batches until the current epoch's examples are used up, so the crossing batch is the last one
of its pass and the next pass starts part-way into the next epoch.

Sharding (as ``DistributedSampler``): every rank walks the same stream; with ``num_replicas = R`` the global
batch ``b`` is cut into ``R`` contiguous equal parts and rank ``r`` yields ``b[r * B/R : (r + 1) * B/R]``,
so the global batch size must be divisible by ``R``. Across ranks every example is seen once per epoch.

Live changes and checkpoints assume the loader asks for one batch at a time (``num_workers=0``): worker
processes prefetch batch indices, so a new batch size would take effect only after the prefetched batches,
and ``state_dict()`` would count prefetched batches as seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from noisescale._checks import check_int


__all__ = ["ResizableBatchSampler", "split_micro_batches", "population_drawn_from"]


class ResizableBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; the batch size may change between batches (module docstring).

    Args:
        num_examples: dataset size N (``len(dataset)``).
        batch_size: global batch size (summed over ranks); 1 <= batch_size <= N, divisible by num_replicas.
        shuffle: shuffle each epoch with a generator seeded ``seed + epoch``; otherwise the order is 0..N-1.
        seed: base seed; must be the same on every rank.
        num_replicas, rank: data-parallel world size and this process's rank.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.num_examples = check_int(num_examples, "num_examples", 1)
        self.num_replicas = check_int(num_replicas, "num_replicas", 1)
        self.rank = check_int(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must lie in [0, num_replicas={self.num_replicas}), got {rank}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        self.shuffle = shuffle
        self.seed = check_int(seed, "seed", 0)
        self.examples_seen = 0
        self._batch_size = self._check_batch_size(batch_size)
        self._borrowed: list[int] = []  # indices the previous epoch's last batch took from this epoch
        self._order_cache: tuple[int, torch.Tensor] | None = None

    def _check_batch_size(self, batch_size: Any) -> int:
        batch_size = check_int(batch_size, "batch_size", 1)
        if batch_size > self.num_examples:
            raise ValueError(f"batch_size={batch_size} exceeds the dataset size num_examples={self.num_examples}")
        if batch_size % self.num_replicas:
            raise ValueError(
                f"batch_size={batch_size} (global) is not divisible by num_replicas={self.num_replicas}; "
                "each rank must get an equal part"
            )
        return batch_size

    @property
    def batch_size(self) -> int:
        """Global batch size of the next batch."""
        return self._batch_size

    @property
    def local_batch_size(self) -> int:
        """This rank's share of the next batch, batch_size / num_replicas."""
        return self._batch_size // self.num_replicas

    @property
    def epoch(self) -> float:
        """Fractional epoch: examples_seen / num_examples (global examples, all ranks together)."""
        return self.examples_seen / self.num_examples

    def set_batch_size(self, batch_size: int) -> None:
        """Set the global batch size of the batches yielded from now on."""
        self._batch_size = self._check_batch_size(batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """randperm(N) under a generator seeded ``seed + epoch`` (arange(N) without shuffling)."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def _current_order(self, epoch: int) -> torch.Tensor:
        """The current epoch's order: the borrowed indices first, then the rest of its permutation."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            permutation = self.permutation(epoch)
            borrowed = torch.tensor(self._borrowed, dtype=torch.long)
            not_borrowed = torch.ones(self.num_examples, dtype=torch.bool)
            not_borrowed[borrowed] = False
            self._order_cache = (epoch, torch.cat([borrowed, permutation[not_borrowed[permutation]]]))
        return self._order_cache[1]

    def _next_global_batch(self) -> torch.Tensor:
        """The next batch_size indices of the stream; advances examples_seen (and the epoch when it crosses)."""
        epoch, offset = divmod(self.examples_seen, self.num_examples)
        tail = self._current_order(epoch)[offset : offset + self._batch_size]
        self.examples_seen += self._batch_size
        missing = self._batch_size - len(tail)
        if offset + self._batch_size >= self.num_examples:
            next_permutation = self.permutation(epoch + 1)
            not_in_tail = torch.ones(self.num_examples, dtype=torch.bool)
            not_in_tail[tail] = False
            self._borrowed = next_permutation[not_in_tail[next_permutation]][:missing].tolist()
            self._order_cache = None
        return torch.cat([tail, torch.tensor(self._borrowed[:missing], dtype=torch.long)])

    def __iter__(self) -> Iterator[list[int]]:
        """Batches until the current epoch's examples are used up (the last one may borrow from the next)."""
        end_of_epoch = (self.examples_seen // self.num_examples + 1) * self.num_examples
        while self.examples_seen < end_of_epoch:
            local = self.local_batch_size
            global_batch = self._next_global_batch()
            yield global_batch[self.rank * local : (self.rank + 1) * local].tolist()

    def __len__(self) -> int:
        """Batches left in the current pass at the current batch size (exact only if it does not change)."""
        remaining = self.num_examples - self.examples_seen % self.num_examples
        return math.ceil(remaining / self._batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream and the settings that define it (plain Python types)."""
        return {
            "examples_seen": self.examples_seen,
            "batch_size": self._batch_size,
            "borrowed": list(self._borrowed),
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; num_examples, shuffle and seed must match (num_replicas may differ)."""
        for key in ("num_examples", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}")
        examples_seen = check_int(state["examples_seen"], "examples_seen", 0)
        borrowed = [int(index) for index in state["borrowed"]]
        offset = examples_seen % self.num_examples
        in_range = all(0 <= index < self.num_examples for index in borrowed)
        if len(borrowed) > offset or len(set(borrowed)) != len(borrowed) or not in_range:
            raise ValueError(
                f"state_dict 'borrowed' must hold at most examples_seen % num_examples = {offset} distinct indices "
                f"in [0, {self.num_examples}), got {len(borrowed)} entries"
            )
        self._batch_size = self._check_batch_size(state["batch_size"])
        self.examples_seen = examples_seen
        self._borrowed = borrowed
        self._order_cache = None


def split_micro_batches(batch_size: int, max_micro_batch: int) -> list[int]:
    """Sizes of the fewest micro-batches of at most ``max_micro_batch`` that sum to ``batch_size``.

    ceil(B / M) parts whose sizes differ by at most one (the larger ones first), e.g. (10, 4) -> [4, 3, 3].
    For gradient accumulation of a mean loss, weight micro-batch k's mean loss by size_k / B; use the
    sizes with ``torch.split(batch, sizes)``.
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    max_micro_batch = check_int(max_micro_batch, "max_micro_batch", 1)
    count = math.ceil(batch_size / max_micro_batch)
    base, extra = divmod(batch_size, count)
    return [base + 1] * extra + [base] * (count - extra)


_ACCELERATE = "accelerate.data_loader"   # accelerate's classes, matched by name: no import of an optional package
_ACCELERATE_BATCH_WRAPPERS = ("BatchSamplerShard", "SkipBatchSampler")   # share out / skip whole batches
_ACCELERATE_RANDOM = "SeedableRandomSampler"   # RandomSampler, reseeded each epoch


def _of_accelerate(obj: Any, names: tuple[str, ...]) -> bool:
    return type(obj).__module__ == _ACCELERATE and type(obj).__name__ in names


def population_drawn_from(loader: Any) -> int | None:
    """N, where every batch of ``loader`` is drawn without replacement from its dataset of N examples (so that the
    noise-scale estimates take the finite-population correction: :mod:`noisescale.estimators`); None otherwise.

    ``loader``: a DataLoader, or a wrapper that exposes its ``batch_sampler`` and ``dataset`` (accelerate's
    ``DataLoaderShard``, which HuggingFace's Trainer builds). Recognised, by exact type (a subclass may draw
    otherwise: Lightning's ``DistributedSamplerWrapper`` around a weighted sampler): a
    :class:`ResizableBatchSampler`, and torch's ``BatchSampler`` over a ``RandomSampler`` without replacement over
    the whole dataset (or accelerate's ``SeedableRandomSampler``), a ``DistributedSampler`` (whose ranks share one
    permutation) or a ``SequentialSampler``, as is or shared out among the ranks by accelerate's
    ``BatchSamplerShard`` (or skipped into by its ``SkipBatchSampler`` on a resume). A sequential order counts as a
    draw where the dataset is stored in random order; stored sorted (by class, say), its fixed batches are no
    random draw at all, corrected or not. Anything else (a custom or weighted sampler, an iterable dataset, a plain
    iterable of batches) gives None.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(batch_sampler) is ResizableBatchSampler:
        return batch_sampler.num_examples if batch_sampler.num_examples >= 2 else None
    while _of_accelerate(batch_sampler, _ACCELERATE_BATCH_WRAPPERS) and hasattr(batch_sampler, "batch_sampler"):
        batch_sampler = batch_sampler.batch_sampler
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler = batch_sampler.sampler
    try:
        size = len(loader.dataset)
    except (AttributeError, TypeError):   # no dataset, or an iterable one
        return None
    random = ((type(sampler) is RandomSampler or _of_accelerate(sampler, (_ACCELERATE_RANDOM,)))
              and not sampler.replacement and sampler.num_samples == size)
    whole = random or type(sampler) in (SequentialSampler, DistributedSampler)
    return size if whole and size >= 2 else None
