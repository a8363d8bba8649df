"""Benchmark: step time of DistributedDataParallel training with and without noisescale's measurements.

Two sections, each timing full training steps (forward, cross-entropy, backward with DDP's all-reduce, SGD step)
of an MLP 784-512-512-10 (about 670k parameters) on synthetic data, rotating which variant goes first, and
reporting the median over the timed steps after warm-up (rank 0's clock, each step after a barrier) and its ratio
to the section's baseline, and the mean and its ratio (the median hides the measured steps of a sparse variant;
the mean does not). Also the median CPU time of rank 0's process per step (all its threads, gloo's included) and
its ratio: on a machine that other processes load, the wall clock counts the time a rank waits for a core, the CPU
time mostly does not.

``hook``: plain DDP against :class:`noisescale.distributed.DDPNoiseScale` (the communication hook, measuring every
step or every ``--sparse-every``-th), and a copy with only the reducing hook it wraps (``mean_allreduce_hook``),
which separates the cost of any Python communication hook from noisescale's. A second plain DDP model timed as a
variant of its own gives the ratio of two identical variants (A/A), the noise of that run's ratios. Two reference
rows price the parts of a measurement without a hook: plain DDP followed by one more all-reduce of two numbers per
step (what the hook saves by carrying its totals in the last bucket's all-reduce), and plain DDP followed by two
squared norms of every gradient (the two reads of the gradient that any two-batch measurement makes; one
``torch.dot`` per parameter, so its Python overhead is counted too).

``trainer``: :class:`noisescale.training.AdaptiveTrainer` on a DDP model (per-example norms every step, one
all-gather of the per-example numbers; with a noise-scale policy, one broadcast of its state) against a plain DDP
loop on the same sampler's batches; and, to separate what DDP adds from what the per-example norms cost anyway,
the same trainer and plain loop on an unwrapped model with this rank's shard in each process.

    PYTHONPATH=. python analysis/bench_ddp.py [--sections hook trainer] [--world-size 2] [--backend gloo|nccl]
                                 [--batch 64] [--steps 400] [--warmup 10] [--sparse-every 10] [--out data/bench/ddp.csv]

gloo runs on CPU (one thread per rank); nccl puts rank r on GPU r and needs world-size GPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from tqdm import tqdm

from noisescale.controller import NoiseScaleBatchPolicy
from noisescale.distributed import DDPNoiseScale, mean_allreduce_hook
from noisescale.losses import per_example_cross_entropy
from noisescale.sampler import ResizableBatchSampler
from noisescale.training import AdaptiveTrainer

LAYER_WIDTHS = (784, 512, 512, 10)
TRAINER_EXAMPLES = 8192
SECTIONS = ("hook", "trainer")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for width_in, width_out in zip(LAYER_WIDTHS[:-1], LAYER_WIDTHS[1:]):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


def _plain_step(model, optimizer, inputs, labels, after_backward=None) -> None:
    F.cross_entropy(model(inputs), labels).backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


Variants = dict[str, tuple[Callable[[int], None], str]]  # name -> (step function of the step index, baseline name)


def _hook_variants(args, device, device_ids, rank) -> Variants:
    """Section ``hook``: one step function per variant, all on the same per-step random batch."""
    plain, plain_again, python_hook, hooked, sparse, extra_collective, two_reads = (
        DistributedDataParallel(_mlp().to(device), device_ids=device_ids) for _ in range(7)
    )
    python_hook.register_comm_hook(None, mean_allreduce_hook)
    every_step = DDPNoiseScale(hooked, args.batch)
    sparse_noise = DDPNoiseScale(sparse, args.batch, measure_every=args.sparse_every)
    generator = torch.Generator().manual_seed(1 + rank)
    batches = [
        (torch.randn(args.batch, LAYER_WIDTHS[0], generator=generator).to(device),
         torch.randint(0, LAYER_WIDTHS[-1], (args.batch,), generator=generator).to(device))
        for _ in range(args.warmup + args.steps)
    ]

    def variant(model, after_backward=None):
        optimizer = _sgd(model)
        return lambda step: _plain_step(model, optimizer, *batches[step], after_backward)

    two_numbers = torch.zeros(2, dtype=torch.float64, device=device)

    def squared_norms_twice():
        for _ in range(2):
            torch.stack([torch.dot(p.grad.view(-1), p.grad.view(-1)) for p in two_reads.parameters()]).sum().item()

    baseline = "plain DDP"
    return {
        baseline: (variant(plain), baseline),
        "plain DDP again (A/A: the noise of this run's ratios)": (variant(plain_again), baseline),
        "DDP + mean_allreduce_hook (Python hook only)": (variant(python_hook), baseline),
        "DDP + noise-scale hook, every step": (variant(hooked, every_step.step_estimate), baseline),
        f"DDP + noise-scale hook, every {args.sparse_every}th step": (
            variant(sparse, sparse_noise.step_estimate), baseline
        ),
        "DDP + one more all-reduce of 2 numbers (reference)": (
            variant(extra_collective, lambda: dist.all_reduce(two_numbers)), baseline
        ),
        "DDP + |grad|^2 twice after backward (reference)": (variant(two_reads, squared_norms_twice), baseline),
    }


def _trainer_variants(args, device, device_ids, rank) -> Variants:
    """Section ``trainer``: AdaptiveTrainer against a plain loop on the same sampler's batches, under DDP
    (global batch = world size x --batch) and on an unwrapped model (this rank's --batch examples)."""
    world_size = args.world_size
    generator = torch.Generator().manual_seed(2)
    dataset = TensorDataset(
        torch.randn(TRAINER_EXAMPLES, LAYER_WIDTHS[0], generator=generator).to(device),
        torch.randint(0, LAYER_WIDTHS[-1], (TRAINER_EXAMPLES,), generator=generator).to(device),
    )

    def plain_loop(model, replicas):
        sampler = ResizableBatchSampler(TRAINER_EXAMPLES, args.batch * replicas, seed=3,
                                        num_replicas=replicas, rank=rank if replicas > 1 else 0)
        optimizer = _sgd(model)
        return lambda step: _plain_step(model, optimizer, *dataset[next(iter(sampler))])

    def trainer(model, replicas, **source):
        trainer = AdaptiveTrainer(model, per_example_cross_entropy, _sgd(model), dataset, seed=3, progress=False,
                                  **(source or {"batch_size": args.batch * replicas}))
        return lambda step: trainer.step()

    def ddp():
        return DistributedDataParallel(_mlp().to(device), device_ids=device_ids)

    global_batch = args.batch * world_size
    fixed_policy = NoiseScaleBatchPolicy(global_batch, min_batch_size=global_batch, max_batch_size=global_batch,
                                         granularity=world_size)
    ddp_baseline, one_process_baseline = "plain DDP loop", "plain loop, one process"
    return {
        ddp_baseline: (plain_loop(ddp(), world_size), ddp_baseline),
        "AdaptiveTrainer, DDP, fixed batch": (trainer(ddp(), world_size), ddp_baseline),
        "AdaptiveTrainer, DDP, noise-scale policy (B held)": (
            trainer(ddp(), world_size, policy=fixed_policy), ddp_baseline
        ),
        one_process_baseline: (plain_loop(_mlp().to(device), 1), one_process_baseline),
        "AdaptiveTrainer, one process": (trainer(_mlp().to(device), 1), one_process_baseline),
    }


def _time_rotating(variants: Variants, args, device, rank, section) -> tuple[dict[str, list[float]], ...]:
    """Wall and process CPU seconds per timed step of every variant; each step starts after a barrier, ends
    synchronised."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for step in tqdm(range(args.warmup + args.steps), disable=rank != 0 or not args.progress, desc=section):
        for name in order:
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            variants[name][0](step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        order = order[1:] + order[:1]  # rotate which variant goes first
    return times, cpu_times


def _worker(rank: int, args: argparse.Namespace, port: int, result_path: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size,
        timeout=timedelta(seconds=300),
    )
    device_ids = [rank] if device.type == "cuda" else None
    builders = {"hook": _hook_variants, "trainer": _trainer_variants}
    setting = {  # the same in every row
        "backend": args.backend,
        "world_size": args.world_size,
        "local_batch": args.batch,
        "parameters": sum(p.numel() for p in _mlp().parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host_cpus": os.cpu_count(),
    }
    rows = []
    for section in args.sections:
        variants = builders[section](args, device, device_ids, rank)
        times, cpu_times = _time_rotating(variants, args, device, rank, section)
        for name, values in times.items():
            baseline_name = variants[name][1]
            baseline, cpu_values, cpu_baseline = times[baseline_name], cpu_times[name], cpu_times[baseline_name]
            rows.append({
                "section": section,
                "method": name,
                "baseline": baseline_name,
                "median_ms": 1e3 * statistics.median(values),
                "ratio_to_baseline": statistics.median(values) / statistics.median(baseline),
                "mean_ms": 1e3 * statistics.fmean(values),
                "mean_ratio_to_baseline": statistics.fmean(values) / statistics.fmean(baseline),
                "cpu_median_ms": 1e3 * statistics.median(cpu_values),
                "cpu_ratio_to_baseline": statistics.median(cpu_values) / statistics.median(cpu_baseline),
                "timed_steps": len(values),
                **setting,
            })
    if rank == 0:
        pd.DataFrame(rows).to_csv(result_path, index=False)
    dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on this host for the processes' rendezvous (also used by bench_fsdp.py)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sparse-every", type=int, default=10, help="measure_every of the sparse hook variant")
    parser.add_argument("--out", type=Path, default=Path("data/bench/ddp.csv"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.world_size < 2:
        parser.error("--world-size must be >= 2: the hook compares local and all-reduced gradients")
    if args.steps < 20:
        parser.error("--steps must be >= 20 for a median worth reporting")
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        parser.error(f"--backend nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as scratch:
        result_path = os.path.join(scratch, "rank0.csv")
        mp.spawn(_worker, args=(args, free_port(), result_path), nprocs=args.world_size, join=True)
        table = pd.read_csv(result_path)
    columns = ["section", "method", "median_ms", "ratio_to_baseline", "mean_ms", "mean_ratio_to_baseline",
               "cpu_median_ms", "cpu_ratio_to_baseline"]
    print(table[columns].to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
