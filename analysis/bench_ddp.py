"""Benchmark: step time of plain DDP against DDP with noisescale's noise-scale hook (DDPNoiseScale).

Each rank holds identical DistributedDataParallel copies of an MLP 784-512-512-10 (about 670k
parameters), one plain and one with :class:`noisescale.distributed.DDPNoiseScale`, and times full training
steps (forward, cross-entropy, backward with DDP's all-reduce, SGD step; plus ``step_estimate()`` for the
hooked copy) on synthetic data, rotating which copy goes first. A third copy registers the reducing hook that
DDPNoiseScale wraps (``mean_allreduce_hook``) and nothing else, to separate the cost of any Python communication hook from noisescale's;
a fourth measures only every ``--sparse-every``-th step (``measure_every``). Reported: the median over the timed steps
after warm-up (rank 0's clock, after a barrier) and its ratio to plain DDP, and the mean and its ratio (the
median hides the measured steps of the sparse variant; the mean does not).

    PYTHONPATH=. python analysis/bench_ddp.py [--world-size 2] [--backend gloo|nccl] [--batch 64] [--steps 30]
                                 [--warmup 5] [--sparse-every 10] [--out data/bench/ddp.csv]

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
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from noisescale.distributed import DDPNoiseScale, mean_allreduce_hook

LAYER_WIDTHS = (784, 512, 512, 10)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for width_in, width_out in zip(LAYER_WIDTHS[:-1], LAYER_WIDTHS[1:]):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _step(model, optimizer, inputs, labels, noise) -> float:
    """One timed training step; returns seconds (synchronised with the device and the other ranks)."""
    dist.barrier()
    start = time.perf_counter()
    F.cross_entropy(model(inputs), labels).backward()
    if noise is not None:
        noise.step_estimate()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _worker(rank: int, args: argparse.Namespace, port: int, result_path: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size,
        timeout=timedelta(seconds=120),
    )
    device_ids = [rank] if device.type == "cuda" else None
    plain, python_hook, hooked, sparse = (
        DistributedDataParallel(_mlp().to(device), device_ids=device_ids) for _ in range(4)
    )
    python_hook.register_comm_hook(None, mean_allreduce_hook)
    methods = {
        "plain DDP": (plain, None),
        "DDP + mean_allreduce_hook (Python hook only)": (python_hook, None),
        "DDP + noise-scale hook, every step": (hooked, DDPNoiseScale(hooked, args.batch)),
        f"DDP + noise-scale hook, every {args.sparse_every}th step": (
            sparse, DDPNoiseScale(sparse, args.batch, measure_every=args.sparse_every)
        ),
    }
    methods = {name: (model, torch.optim.SGD(model.parameters(), lr=0.01), noise) for name, (model, noise) in methods.items()}
    generator = torch.Generator().manual_seed(1 + rank)
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for step in tqdm(range(args.warmup + args.steps), disable=rank != 0 or not args.progress, desc="steps"):
        inputs = torch.randn(args.batch, LAYER_WIDTHS[0], generator=generator).to(device)
        labels = torch.randint(0, LAYER_WIDTHS[-1], (args.batch,), generator=generator).to(device)
        for name in order:
            seconds = _step(*methods[name][:2], inputs, labels, methods[name][2])
            if step >= args.warmup:
                times[name].append(seconds)
        order = order[1:] + order[:1]  # rotate which method goes first
    if rank == 0:
        parameters = sum(p.numel() for p in plain.parameters())
        baseline = statistics.median(times["plain DDP"])
        rows = [
            {
                "method": name,
                "median_ms": 1e3 * statistics.median(values),
                "ratio_to_plain": statistics.median(values) / baseline,
                "mean_ms": 1e3 * statistics.fmean(values),
                "mean_ratio_to_plain": statistics.fmean(values) / statistics.fmean(times["plain DDP"]),
                "backend": args.backend,
                "world_size": args.world_size,
                "local_batch": args.batch,
                "parameters": parameters,
                "timed_steps": len(values),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                "host_cpus": os.cpu_count(),
            }
            for name, values in times.items()
        ]
        pd.DataFrame(rows).to_csv(result_path, index=False)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (>= 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sparse-every", type=int, default=10, help="measure_every of the fourth variant")
    parser.add_argument("--out", type=Path, default=Path("data/bench/ddp.csv"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.world_size < 2:
        parser.error("--world-size must be >= 2: the hook compares local and all-reduced gradients")
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        parser.error(f"--backend nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as scratch:
        result_path = os.path.join(scratch, "rank0.csv")
        mp.spawn(_worker, args=(args, _free_port(), result_path), nprocs=args.world_size, join=True)
        table = pd.read_csv(result_path)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
