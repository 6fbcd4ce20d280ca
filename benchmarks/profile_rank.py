"""Where one data-parallel rank's step time goes on CPU: compute, gloo collectives, or waiting.

Two ranks (gloo, one thread each) train ddp_scaling.py's workload (MLP 4x1024, global batch
512, Adam) through gpupar's own loop; rank 0 runs under ``torch.profiler`` for the timed
steps and prints its top operators by self CPU time, grouped into compute (matmuls, the
optimizer, elementwise), communication (``gloo:*`` / ``c10d::*`` collectives, whose time
includes waiting for the slower peer) and the rest.

    python benchmarks/profile_rank.py [--strategy ddp|fsdp] [--steps 10] [--bucket-mb 25] [--static-graph]
                                      [--no-reshard] [--fsdp-blocks auto|none]
"""

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rank_main(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="profile")
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile

    from gpupar.bench.driver import strategy_config
    from gpupar.problem import load_problem
    from gpupar.topology import Topology
    from gpupar.data import as_samples
    from gpupar.training.loop import Hooks, fit
    from gpupar.training.recipe import make_loss, make_optimizer
    from gpupar.parallelize import parallelize

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_scaling import workload

    base = workload()
    base.parallel.ddp_bucket_mb = args.bucket_mb
    base.parallel.reshard_after_forward, base.parallel.fsdp_blocks = not args.no_reshard, args.fsdp_blocks
    base.parallel.ddp_static_graph = args.static_graph
    cfg = strategy_config(base, args.strategy, world, args.steps, 3)
    topo = Topology.from_env(cfg)
    problem = load_problem(cfg)
    train_set, _ = as_samples((problem.X, problem.y), cfg)
    parallel = parallelize(problem.model, topo, cfg, problem.spec)
    optimizer = make_optimizer(parallel.model, cfg)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(parallel, train_set, cfg, topo, make_loss(cfg, problem.spec.loss), optimizer,
            hooks=Hooks(log=lambda _: None))
    if rank == 0:
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        groups = {"communication (incl. waiting)": 0.0, "compute": 0.0, "other": 0.0}
        for e in events:
            name = e.key
            if name.startswith(("gloo:", "c10d::", "nccl:")) or "all_reduce" in name or "reduce_scatter" in name \
                    or "all_gather" in name or "wait" in name.lower():
                groups["communication (incl. waiting)"] += e.self_cpu_time_total
            elif name.startswith("aten::") or "Optimizer" in name or "fused_adam" in name:
                groups["compute"] += e.self_cpu_time_total
            else:
                groups["other"] += e.self_cpu_time_total
        print(f"rank 0, {args.strategy} x {world} ({' '.join(sys.argv[1:])}), {cfg.train.epochs} steps (3 warm-up), load "
              f"{os.getloadavg()[0]:.2f}: self CPU time {total / 1e3:.1f} ms")
        for group, us in groups.items():
            print(f"  {group:32s} {us / 1e3:9.1f} ms  {us / max(total, 1):6.1%}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    topo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--no-reshard", action="store_true", help="fsdp: keep parameters from forward to backward")
    parser.add_argument("--fsdp-blocks", default="auto", help="fsdp units: auto or none (the root only)")
    parser.add_argument("--static-graph", action="store_true", help="ddp: static_graph=True")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main()
