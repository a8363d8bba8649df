"""ResizableBatchSampler and split_micro_batches against independent references.

Reference for the index stream: the rule stated by the module, rebuilt here as a naive list simulation:
epoch e is torch.randperm(N) under a generator seeded seed + e; a batch that crosses an epoch's end is
topped up with the first indices of the next permutation it does not already hold, and those open the
next epoch.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from noisescale.sampler import ResizableBatchSampler, population_drawn_from, split_micro_batches


def reference_epoch(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def reference_batches(num_examples: int, seed: int, batch_sizes: list[int]) -> list[list[int]]:
    """Naive per-example simulation of the documented stream."""
    epoch, order, position, batches = 0, reference_epoch(num_examples, seed, 0), 0, []
    for size in batch_sizes:
        batch = order[position : position + size]
        position += size
        if position >= num_examples:
            epoch += 1
            borrowed = [i for i in reference_epoch(num_examples, seed, epoch) if i not in batch][: size - len(batch)]
            batch = batch + borrowed
            order = borrowed + [i for i in reference_epoch(num_examples, seed, epoch) if i not in borrowed]
            position = len(borrowed)
        batches.append(batch)
    return batches


def random_batch_sizes(rng: np.random.Generator, count: int, num_examples: int, multiple: int = 1) -> list[int]:
    return [int(multiple * rng.integers(1, num_examples // multiple + 1)) for _ in range(count)]


def run_batches(sampler: ResizableBatchSampler, batch_sizes: list[int]) -> list[list[int]]:
    """One batch per entry of batch_sizes (set just before it is drawn), starting new passes as needed."""
    batches: list[list[int]] = []
    iterator = iter(sampler)
    for size in batch_sizes:
        sampler.set_batch_size(size)
        batch = next(iterator, None)
        if batch is None:  # the pass ended with the previous batch
            iterator = iter(sampler)
            batch = next(iterator)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_each_index_once_per_epoch_under_random_batch_changes(seed):
    num_examples = 37
    rng = np.random.default_rng(seed)
    batch_sizes = random_batch_sizes(rng, 60, num_examples)
    sampler = ResizableBatchSampler(num_examples, batch_sizes[0], seed=seed)
    batches = run_batches(sampler, batch_sizes)

    assert [len(batch) for batch in batches] == batch_sizes
    stream = [index for batch in batches for index in batch]
    complete_epochs = len(stream) // num_examples
    assert complete_epochs >= 5
    for epoch in range(complete_epochs):
        chunk = stream[epoch * num_examples : (epoch + 1) * num_examples]
        assert sorted(chunk) == list(range(num_examples))
    assert all(len(set(batch)) == len(batch) for batch in batches)  # no example twice in a batch
    assert batches == reference_batches(num_examples, seed, batch_sizes)
    assert sampler.examples_seen == sum(batch_sizes)
    assert sampler.epoch == pytest.approx(sum(batch_sizes) / num_examples)


def test_pass_ends_with_the_batch_that_crosses_the_epoch_boundary():
    sampler = ResizableBatchSampler(10, 4, shuffle=False)
    assert len(sampler) == 3
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert len(sampler) == 2  # 8 examples of epoch 1 left
    assert list(sampler) == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert sampler.epoch == 2.0


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_shards_are_equal_disjoint_and_cover_the_global_batch(num_replicas):
    num_examples, seed = 60, 5
    rng = np.random.default_rng(num_replicas)
    batch_sizes = random_batch_sizes(rng, 40, num_examples, multiple=num_replicas)
    global_batches = run_batches(ResizableBatchSampler(num_examples, batch_sizes[0], seed=seed), batch_sizes)
    local_batches = [
        run_batches(
            ResizableBatchSampler(num_examples, batch_sizes[0], seed=seed, num_replicas=num_replicas, rank=rank),
            batch_sizes,
        )
        for rank in range(num_replicas)
    ]
    for step, global_batch in enumerate(global_batches):
        parts = [local_batches[rank][step] for rank in range(num_replicas)]
        assert all(len(part) == len(global_batch) // num_replicas for part in parts)
        merged = [index for part in parts for index in part]
        assert len(set(merged)) == len(merged)  # disjoint
        assert merged == global_batch  # covering, in order
    stream = [index for step in range(len(batch_sizes)) for rank in range(num_replicas) for index in local_batches[rank][step]]
    for epoch in range(len(stream) // num_examples):
        assert sorted(stream[epoch * num_examples : (epoch + 1) * num_examples]) == list(range(num_examples))


@pytest.mark.parametrize("stop_after", [3, 11, 17, "after_first_crossing"])
def test_resume_mid_epoch_gives_the_uninterrupted_sequence(stop_after):
    num_examples, seed = 29, 3
    batch_sizes = random_batch_sizes(np.random.default_rng(5), 30, num_examples)
    if stop_after == "after_first_crossing":  # checkpoint holds the borrowed indices that open the epoch
        stop_after = 1 + next(i for i in range(30) if sum(batch_sizes[: i + 1]) > num_examples)
    uninterrupted = run_batches(ResizableBatchSampler(num_examples, batch_sizes[0], seed=seed), batch_sizes)

    first = ResizableBatchSampler(num_examples, batch_sizes[0], seed=seed)
    before = run_batches(first, batch_sizes[:stop_after])
    checkpoint = json.loads(json.dumps(first.state_dict()))  # plain Python types only
    assert len(checkpoint["borrowed"]) <= checkpoint["examples_seen"] % num_examples
    resumed = ResizableBatchSampler(num_examples, 1, seed=seed)
    resumed.load_state_dict(checkpoint)
    after = run_batches(resumed, batch_sizes[stop_after:])
    assert before + after == uninterrupted


def test_resume_with_another_world_size_continues_the_same_stream():
    full = run_batches(ResizableBatchSampler(40, 6, seed=2), [6] * 12)
    first = ResizableBatchSampler(40, 6, seed=2)
    run_batches(first, [6] * 5)
    parts = []
    for rank in range(2):
        sampler = ResizableBatchSampler(40, 2, seed=2, num_replicas=2, rank=rank)
        sampler.load_state_dict(first.state_dict())
        parts.append(run_batches(sampler, [6] * 7))
    assert [a + b for a, b in zip(*parts)] == full[5:]


def test_real_dataloader_with_batch_sampler_and_live_resizing():
    num_examples = 50
    dataset = TensorDataset(torch.arange(num_examples, dtype=torch.float64) * 10.0, torch.arange(num_examples))
    sampler = ResizableBatchSampler(num_examples, 4, seed=11)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    plan = [4, 8, 8, 2, 16, 16, 6, 10, 3, 12, 12, 12]
    seen_sizes, stream = [], []
    step = 0
    while len(stream) < 2 * num_examples:
        for values, indices in loader:
            seen_sizes.append(len(indices))
            torch.testing.assert_close(values, indices.to(torch.float64) * 10.0)
            stream.extend(indices.tolist())
            step += 1
            sampler.set_batch_size(plan[step % len(plan)])
    assert seen_sizes == [plan[i % len(plan)] for i in range(len(seen_sizes))]
    assert sorted(stream[:num_examples]) == sorted(stream[num_examples : 2 * num_examples]) == list(range(num_examples))
    assert [len(b) for b in reference_batches(num_examples, 11, seen_sizes)] == seen_sizes
    assert stream == [i for b in reference_batches(num_examples, 11, seen_sizes) for i in b]


def test_unshuffled_order_is_arange():
    assert run_batches(ResizableBatchSampler(5, 2, shuffle=False), [2, 3, 1]) == [[0, 1], [2, 3, 4], [0]]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by num_replicas=4"):
        ResizableBatchSampler(100, 10, num_replicas=4)
    sampler = ResizableBatchSampler(100, 8, num_replicas=4, rank=3)
    with pytest.raises(ValueError, match="not divisible by num_replicas=4"):
        sampler.set_batch_size(6)
    with pytest.raises(ValueError, match="rank"):
        ResizableBatchSampler(100, 8, num_replicas=4, rank=4)
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        ResizableBatchSampler(10, 11)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        ResizableBatchSampler(10, 2.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ResizableBatchSampler(10, 0)
    bad_state = {**ResizableBatchSampler(10, 2).state_dict(), "borrowed": [3]}
    with pytest.raises(ValueError, match="borrowed"):
        ResizableBatchSampler(10, 2).load_state_dict(bad_state)
    with pytest.raises(ValueError, match="seed=1"):
        ResizableBatchSampler(10, 2, seed=0).load_state_dict(ResizableBatchSampler(10, 2, seed=1).state_dict())


@pytest.mark.parametrize("batch_size", [1, 7, 10, 64, 65, 100, 257])
@pytest.mark.parametrize("max_micro_batch", [1, 3, 10, 64])
def test_split_micro_batches_is_the_fewest_balanced_split(batch_size, max_micro_batch):
    sizes = split_micro_batches(batch_size, max_micro_batch)
    assert sum(sizes) == batch_size
    assert max(sizes) <= max_micro_batch
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    # fewest parts: one fewer part would need a part larger than max_micro_batch (brute-force count)
    fewest = next(k for k in range(1, batch_size + 1) if k * max_micro_batch >= batch_size)
    assert len(sizes) == fewest
    assert len(sizes) == math.ceil(batch_size / max_micro_batch)


def test_split_micro_batches_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_micro_batch must be >= 1"):
        split_micro_batches(10, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        split_micro_batches(10.5, 4)


def test_population_drawn_from_names_the_loaders_that_draw_each_batch_without_replacement():
    """N = len(dataset) exactly where every batch is a draw without replacement from the whole dataset (the
    finite-population correction then applies); None wherever that is not known. Each case is checked against the
    batches the loader yields: within an epoch no index repeats and every one of the N appears."""
    from torch.utils.data import (BatchSampler, DistributedSampler, IterableDataset, RandomSampler,
                                  WeightedRandomSampler)

    dataset = TensorDataset(torch.arange(12))

    def one_epoch_is_a_permutation(loader):
        drawn = torch.cat([batch[0] for batch in loader]).tolist()
        return sorted(drawn) == list(range(12))

    class Streamed(IterableDataset):
        def __iter__(self):
            return iter(range(12))

    recognised = [DataLoader(dataset, batch_size=4), DataLoader(dataset, batch_size=5, shuffle=True),
                  DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=2, rank=0)),
                  DataLoader(dataset, batch_sampler=ResizableBatchSampler(12, 4, seed=1))]
    for loader in recognised:
        assert population_drawn_from(loader) == 12
        if not isinstance(loader.sampler, DistributedSampler):   # (one rank's half of each global batch)
            assert one_epoch_is_a_permutation(loader)
    unknown = [DataLoader(dataset, batch_size=4, sampler=RandomSampler(dataset, replacement=True)),
               DataLoader(dataset, batch_size=4, sampler=RandomSampler(dataset, num_samples=6)),
               DataLoader(dataset, batch_size=4, sampler=WeightedRandomSampler([1.0] * 12, 12)),
               DataLoader(dataset, batch_sampler=[[0, 1], [0, 2]]),
               DataLoader(Streamed(), batch_size=4), [(torch.zeros(4), torch.zeros(4))], None]
    for loader in unknown:
        assert population_drawn_from(loader) is None
    assert population_drawn_from(DataLoader(TensorDataset(torch.zeros(1)), batch_size=1)) is None   # N >= 2

    class Bucketed(BatchSampler):   # a subclass may group its batches (by length, say): not a uniform draw
        pass

    class Resampling(DistributedSampler):   # as Lightning's DistributedSamplerWrapper around a weighted sampler
        pass

    assert population_drawn_from(DataLoader(dataset, batch_sampler=Bucketed(RandomSampler(dataset), 4, False))) is None
    assert population_drawn_from(DataLoader(dataset, batch_size=4, sampler=Resampling(dataset, 2, 0))) is None


def test_population_drawn_from_reads_through_accelerates_sharded_loader():
    """HuggingFace's Trainer trains on accelerate's DataLoaderShard; under DDP its BatchSamplerShard shares each
    shuffled batch among the ranks: the global batch is still a draw without replacement from the dataset."""
    accelerate_data = pytest.importorskip("accelerate.data_loader")
    dataset = TensorDataset(torch.arange(12))
    for processes in (1, 2):
        loader = accelerate_data.prepare_data_loader(DataLoader(dataset, batch_size=2, shuffle=True),
                                                     num_processes=processes, process_index=0, put_on_device=False)
        assert population_drawn_from(loader) == 12
        assert population_drawn_from(accelerate_data.skip_first_batches(loader, 1)) == 12
