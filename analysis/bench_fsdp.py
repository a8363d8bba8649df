"""Benchmark: step time of FSDP training with and without noisescale's monitor (not a test).

A 4-block pre-norm MLP transformer layer stack (width 256, 12 positions, about 2.1M parameters) sharded by FSDP2
(``fully_shard`` per block and on the root) or FSDP1 (flat parameters, one unit per block), on synthetic data.
Two variants per kind, alternating which goes first every step, each step after a barrier, rank 0's clock:

``plain``: forward, per-example cross-entropy, mean, backward (FSDP's reduce-scatter), SGD step;
``monitor``: the same step through :class:`noisescale.training.AccumulatingNoiseScaleMonitor` (ghost norms from
the one backward, one all-gather of the per-example losses and norms, one all-reduce of the sharded gradient's
squared norm), as AdaptiveTrainer runs it.

Reports the median and mean step time after warm-up and their ratios to ``plain``; the machine is named and its
load average recorded, since on a shared machine the spread between runs is larger than the effect measured.

    PYTHONPATH=. python analysis/bench_fsdp.py [--kinds fsdp2 fsdp1] [--steps 60] [--warmup 5] [--batch 16]
                                               [--run 1] [--out data/bench/fsdp.csv]
"""

from __future__ import annotations

import argparse
import os
import platform
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
from torch import nn

from bench_ddp import free_port  # analysis/ is on sys.path when this script runs
from noisescale.losses import per_example_cross_entropy
from noisescale.training import AccumulatingNoiseScaleMonitor

WIDTH, POSITIONS, BLOCKS, CLASSES = 256, 12, 4, 10


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(BLOCKS)])
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def _sharded(kind: str, world_size: int) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}))


def _worker(rank: int, world_size: int, port: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=30))
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(args.batch, POSITIONS, WIDTH, generator=generator)
    labels = torch.randint(0, CLASSES, (args.batch,), generator=generator)
    rows = []
    for kind in args.kinds:
        plain_model, monitored_model = _sharded(kind, world_size), _sharded(kind, world_size)
        plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
        monitored_optimizer = torch.optim.SGD(monitored_model.parameters(), lr=1e-3)
        monitor = AccumulatingNoiseScaleMonitor(monitored_model, per_example_cross_entropy)

        def plain() -> None:
            per_example_cross_entropy(plain_model(inputs), labels).mean().backward()
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)

        def monitored() -> None:
            monitor.accumulate([(inputs, labels)])
            monitored_optimizer.step()
            monitored_optimizer.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {"plain": [], "monitor": []}
        variants = [("plain", plain), ("monitor", monitored)]
        for step in range(args.warmup + args.steps):
            for name, function in variants if step % 2 == 0 else variants[::-1]:
                dist.barrier()
                started = time.perf_counter()
                function()
                dist.barrier()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - started)
        monitor.close()
        base_median, base_mean = statistics.median(times["plain"]), statistics.fmean(times["plain"])
        for name, values in times.items():
            rows.append({"run": args.run, "kind": kind, "variant": name, "world_size": world_size,
                         "batch_per_rank": args.batch, "steps": len(values),
                         "median_ms": 1e3 * statistics.median(values), "mean_ms": 1e3 * statistics.fmean(values),
                         "median_ratio": statistics.median(values) / base_median,
                         "mean_ratio": statistics.fmean(values) / base_mean})
    if rank == 0:
        machine = f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        load = os.getloadavg()[0]
        frame = pd.DataFrame(rows).assign(machine=machine, load_average_1min=load,
                                          note="shared machine, loaded: timings indicative only")
        frame.to_csv(out_file, index=False)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["fsdp2", "fsdp1"], choices=["fsdp2", "fsdp1"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--run", type=int, default=1, help="label of this run (the benchmark is run twice)")
    parser.add_argument("--out", default="data/bench/fsdp.csv", help="appended to when it exists")
    args = parser.parse_args()
    if args.batch == POSITIONS:   # the hooks would need a probe to tell the two dims apart, and none runs under FSDP
        parser.error(f"--batch must differ from the model's {POSITIONS} positions")
    with tempfile.TemporaryDirectory() as folder:
        part = os.path.join(folder, "rows.csv")
        mp.start_processes(_worker, args=(args.world_size, free_port(), args, part), nprocs=args.world_size,
                           join=True, start_method="spawn")
        frame = pd.read_csv(part)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        frame = pd.concat([pd.read_csv(out), frame], ignore_index=True)
    temporary = out.with_suffix(".tmp")
    frame.to_csv(temporary, index=False)
    temporary.replace(out)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
