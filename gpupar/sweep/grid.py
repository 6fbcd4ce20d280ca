"""Fused sweeps (`gpupar sweep`): train a grid of seeds x learning rates x widths at once.

Models of one width are fused into one program (gpupar/fused.py); a grid of several
widths becomes one fused chunk per width, and a chunk larger than ``--max-fused K`` (or
than half the free GPU memory) is split. ``--nproc-per-node N`` gives each rank a
contiguous slice of the grid; rank 0 gathers the results, prints the table sorted by
validation loss, and writes ``sweep.jsonl``, ``best.json`` and the best model.

Seeds: every model trains on the same data (the synthetic draw, validation split and
shuffle order come from ``train.seed``, the *data seed*, ``--data-seed``, default 42);
``--seeds`` sets each model's weight-initialisation seed, exactly as ``build_model(...,
seed)`` does for ``gpupar train --seed S``. So model (S, lr) is ``gpupar train --seed S
--lr lr`` when S equals the data seed, and in general it is the model built with seed S
trained alone with ``gpupar.train`` on the sweep's data, which is what the tests compare.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from gpupar.run.files import atomic_write_text
from gpupar.weights import save_weights
from gpupar.config import MAX_SEED, Config
from gpupar.config_file import to_toml
from gpupar.data import Samples, epoch_batches
from gpupar.errors import UsageError
from gpupar.sweep.fused import FusedOptimizer, check_vmappable, clip_per_model, evaluate, fuse, train_step
from gpupar.models import build_model
from gpupar.topology import Topology


# ----------------------------------------------------------------------------- the grid

@dataclass(frozen=True)
class Member:
    """One model of the sweep: its position in the grid, init seed, learning rate and width."""

    index: int
    seed: int
    lr: float
    hidden: int


MAX_MODELS = 100_000  # a grid larger than this is a typo (0-999999999999), not a sweep


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> 0..63, '1,2,5' -> [1, 2, 5], '0-3,8' -> [0, 1, 2, 3, 8].

    The count is checked before a range is expanded, so a typo fails at once, not with
    a MemoryError after filling the memory.
    """
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            bounds = (int(lo), int(hi)) if dash else (int(lo), int(lo))
        except ValueError:
            raise UsageError(f"--seeds {text!r}: expected integers and ranges like 0-63 or 1,2,5") from None
        if bounds[1] < bounds[0]:
            raise UsageError(f"--seeds {text!r}: range {part.strip()} is empty (write low-high)")
        if len(seeds) + bounds[1] - bounds[0] + 1 > MAX_MODELS:
            raise UsageError(f"--seeds {text!r}: more than {MAX_MODELS} seeds; a sweep trains at most "
                             f"{MAX_MODELS} models")
        if bounds[1] > MAX_SEED:
            raise UsageError(f"--seeds {text!r}: seed {bounds[1]} is out of range; accepted: 0 to {MAX_SEED}")
        seeds += range(bounds[0], bounds[1] + 1)
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds {text!r}: seeds must be distinct non-negative integers")
    return seeds


def parse_list(text: str, kind: type, name: str) -> list:
    """'0.001,0.01' -> [0.001, 0.01]: positive numbers (finite), as ``kind``."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name} {text!r}: expected a comma-separated list of "
                         f"{'integers' if kind is int else 'numbers'}, like "
                         f"{'32,50,64' if kind is int else '0.001,0.01'}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"{name} {text!r}: every value must be a positive finite number")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:  # the same point trained twice (0.01 and 1e-2 are one value), as duplicate seeds are refused
        raise UsageError(f"{name} {text!r}: {', '.join(f'{v:g}' for v in twice)} given twice; each value once")
    return values


def grid(seeds: list[int], lrs: list[float], hiddens: list[int]) -> list[Member]:
    """The cross product, width-major so that models of one shape are neighbours."""
    size = len(seeds) * len(lrs) * len(hiddens)
    if size > MAX_MODELS:
        raise UsageError(f"the grid of {len(seeds)} seeds x {len(lrs)} learning rates x {len(hiddens)} widths "
                         f"is {size} models; a sweep trains at most {MAX_MODELS}")
    return [Member(i, s, lr, h) for i, (h, lr, s) in enumerate(itertools.product(hiddens, lrs, seeds))]


def shard(members: list[Member], rank: int, world: int) -> list[Member]:
    """This rank's contiguous block of the sweep (sizes differ by at most one).

    Contiguous, not strided, so that each rank's models stay grouped by width and fuse.
    """
    size, extra = divmod(len(members), world)
    start = rank * size + min(rank, extra)
    return members[start:start + size + (rank < extra)]


def chunks(members: list[Member], max_fused: int) -> list[list[Member]]:
    """Groups of one width (fusion needs one parameter shape), each at most ``max_fused`` models."""
    out: list[list[Member]] = []
    for _, group in itertools.groupby(sorted(members, key=lambda m: (m.hidden, m.index)), key=lambda m: m.hidden):
        group = list(group)
        out += [group[i:i + max_fused] for i in range(0, len(group), max_fused)]
    return out


# ----------------------------------------------------------------------------- training

@dataclass
class Result:
    """One model's outcome; ``state`` (its weights) is kept only for a chunk's best model."""

    member: Member
    train_loss: float  # as gpupar train's "Final loss": the mean over the last logging interval
    val_loss: float | None
    losses: list[float]  # the logged epochs' train losses
    diverged_at: int | None = None  # first step whose loss was NaN or Inf
    state: dict[str, torch.Tensor] | None = None

    def sort_key(self) -> tuple:
        primary = self.val_loss if self.val_loss is not None else self.train_loss
        bad = self.diverged_at is not None or not math.isfinite(primary)
        return (bad, primary if not bad else math.inf, self.member.index)

    def row(self) -> dict:
        return {**asdict(self.member), "train_loss": self.train_loss, "val_loss": self.val_loss,
                "diverged_at_step": self.diverged_at, "losses": self.losses}


def check_supported(cfg: Config) -> None:
    """What the fused loop does not do: name the setting and what is accepted."""
    if cfg.train.grad_accum != 1:
        raise UsageError(f"gpupar sweep: grad_accum {cfg.train.grad_accum} is not supported; use 1")
    if cfg.train.precision != "fp32":
        raise UsageError(f"gpupar sweep: precision {cfg.train.precision!r} is not supported; use fp32")


def lr_factors(cfg: Config, total_steps: int) -> list[float]:
    """The schedule's factor at every step, from the same LambdaLR that gpupar train uses."""
    from gpupar.training.recipe import make_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make_scheduler(probe, cfg, total_steps)
    factors = []
    for _ in range(total_steps):
        factors.append(probe.param_groups[0]["lr"])
        if scheduler is not None:
            probe.step()
            scheduler.step()
    return factors


def train_chunk(members: list[Member], cfg: Config, train_set: Samples, val_set: Samples | None,
                in_features: int, out_features: int, device: torch.device,
                log: Callable[[str], None] = print) -> tuple[list[Result], torch.Tensor]:
    """Train one group of same-width models fused; returns their results and step losses [steps, M].

    The loop mirrors gpupar.training.loop.fit: the same batches, schedule and logging intervals.
    """
    models = [build_model(dataclasses.replace(cfg.model, hidden=m.hidden), in_features, out_features, m.seed)
              for m in members]
    f = fuse(models, device)
    t = cfg.train
    loss_name = t.loss or ("cross-entropy" if cfg.data.task == "classification" else "mse")
    batch_size = t.batch_size or len(train_set)
    if batch_size > len(train_set):
        raise UsageError(f"--batch-size {batch_size} exceeds the {len(train_set)} training samples")
    total_steps = int(min(t.max_steps or math.inf, t.epochs * (len(train_set) // batch_size)))
    factors = lr_factors(cfg, total_steps)
    optimizer = FusedOptimizer(f, [m.lr for m in members], cfg)
    train_set = train_set.to(device)
    full = train_set.take_to(slice(None), device) if t.batch_size is None and not cfg.data.shuffle else None
    check_vmappable(f, train_set.take_to(slice(0, 2), device)[0], log)

    step_losses: list[torch.Tensor] = []  # [M] per step; no .item() per step, so a GPU never waits
    logged: list[torch.Tensor] = []  # [M] mean train loss of each logged epoch
    for epoch in range(t.epochs):
        epoch_start = len(step_losses)
        batches = [None] if full else epoch_batches(len(train_set), batch_size, cfg.data.shuffle, t.seed, epoch)
        for i, batch in enumerate(batches):
            x, y = full or train_set.take_to(batch, device)
            step_losses.append(train_step(f, x, y, loss_name))  # forward + backward of all M models
            if cfg.optim.clip_grad_norm is not None:
                clip_per_model(f, cfg.optim.clip_grad_norm)
            optimizer.step(factors[len(step_losses) - 1])
            optimizer.zero_grad()
            done = len(step_losses) >= total_steps
            if done or (i == len(batches) - 1 and ((epoch + 1) % t.log_every == 0 or epoch + 1 == t.epochs)):
                # As gpupar train logs: the mean of the logged epoch's step losses.
                logged.append(torch.stack(step_losses[epoch_start:]).double().mean(0))
            if done:
                break
        if len(step_losses) >= total_steps:
            break

    all_losses = torch.stack(step_losses).cpu()  # [steps, M]
    curve = torch.stack(logged).cpu()  # [logs, M]
    val = _validation(f, val_set, loss_name, device, batch_size) if val_set is not None and len(val_set) else None
    results = []
    for j, m in enumerate(members):
        bad = (~torch.isfinite(all_losses[:, j])).nonzero()
        results.append(Result(m, float(curve[-1, j]), None if val is None else float(val[j]),
                              curve[:, j].tolist(), int(bad[0, 0]) + 1 if len(bad) else None))
    best = min(range(len(results)), key=lambda j: results[j].sort_key())
    results[best].state = f.state_dict(best)
    return results, all_losses


def _validation(f, samples: Samples, loss_name: str, device: torch.device, batch_size: int) -> torch.Tensor:
    """Mean validation loss of each model [M], batch by batch, as gpupar train's evaluate."""
    from gpupar.sweep.fused import loss_divisor

    total, n = torch.zeros(f.M, dtype=torch.float64), 0
    for start in range(0, len(samples), batch_size):
        x, y = samples.take_to(slice(start, start + batch_size), device)
        total += (evaluate(f, x, y, loss_name) / loss_divisor(loss_name, len(x), y)).double().cpu() * len(x)
        n += len(x)
    return total / max(n, 1)


def fused_capacity(cfg: Config, widest: int, n_samples: int, in_features: int, out_features: int,
                   device: torch.device) -> int | None:
    """How many models of the widest width fit in half the free GPU memory; None = no limit (CPU).

    Per model: parameters, gradient and two Adam moments (4 copies), plus about 3 floats
    (activation, its gradient, a temporary) per unit of every layer for each sample.
    """
    if device.type != "cuda":
        return None
    probe = build_model(dataclasses.replace(cfg.model, hidden=widest), in_features, out_features, 0)
    params = sum(p.numel() for p in probe.parameters())
    units = sum(mod.out_features for mod in probe.modules() if isinstance(mod, torch.nn.Linear)) or params
    per_model = 4 * (4 * params + 3 * (cfg.train.batch_size or n_samples) * units)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * 0.5 // per_model))


# ----------------------------------------------------------------------------- the whole sweep

@dataclass
class SweepResult:
    results: list[Result]  # every model of the sweep, sorted best first (on rank 0; this rank's otherwise)
    wall_time: float
    chunks: int

    @property
    def best(self) -> Result:
        return self.results[0]


def run_sweep(cfg: Config, members: list[Member], topo: Topology, max_fused: int | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Train this rank's slice of ``members`` in fused chunks; gather all results on rank 0."""
    from gpupar.data import as_samples
    from gpupar.job import load_problem

    check_supported(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden=members[0].hidden))
    problem = load_problem(cfg)  # the shared data (seeded by train.seed) and a shape check of one model
    in_features = problem.X.shape[1]
    out_features = int(problem.y.max()) + 1 if cfg.data.task == "classification" else problem.y.shape[1]
    train_set, val_set = as_samples((problem.X, problem.y), cfg)
    mine = shard(members, topo.rank, topo.world_size)
    capacity = fused_capacity(cfg, max(m.hidden for m in members), len(train_set), in_features, out_features,
                              topo.device)
    limit = min(max_fused or len(mine) or 1, capacity or len(mine) or 1)
    groups = chunks(mine, limit)

    start = time.perf_counter()
    results: list[Result] = []
    for group in groups:
        results += train_chunk(group, cfg, train_set, val_set, in_features, out_features, topo.device, log)[0]
    wall = time.perf_counter() - start
    if topo.distributed and dist.is_initialized():
        gathered: list = [None] * topo.world_size
        dist.all_gather_object(gathered, (results, wall, len(groups)))
        results = [r for part in gathered for r in part[0]]
        wall, n_chunks = max(p[1] for p in gathered), sum(p[2] for p in gathered)
    else:
        n_chunks = len(groups)
    results.sort(key=Result.sort_key)
    for r in results[1:]:
        r.state = None  # only the overall best model's weights are kept
    return SweepResult(results, wall, n_chunks)


def table(results: list[Result]) -> str:
    """Plain-text table, best first."""
    lines = [f"{'rank':>4} {'model':>5} {'seed':>5} {'lr':>9} {'hidden':>6} {'train_loss':>11} {'val_loss':>11}"]
    for place, r in enumerate(results, 1):
        m = r.member
        val = "-" if r.val_loss is None else f"{r.val_loss:.6f}"
        note = f"  diverged at step {r.diverged_at}" if r.diverged_at else ""
        lines.append(f"{place:>4} {m.index:>5} {m.seed:>5} {m.lr:>9.3g} {m.hidden:>6} {r.train_loss:>11.6f} "
                     f"{val:>11}{note}")
    return "\n".join(lines)


def write_outputs(sweep: SweepResult, cfg: Config, run_dir: Path, export_best: str | None = None) -> list[Path]:
    """sweep.jsonl (one model a line, best first), best.json, config.toml, best/ and the export."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    atomic_write_text(run_dir / "sweep.jsonl", "".join(json.dumps(r.row()) + "\n" for r in sweep.results))
    best = sweep.best
    atomic_write_text(run_dir / "best.json", json.dumps({**best.row(), "wall_time_s": sweep.wall_time,
                                                         "models": len(sweep.results)}, indent=2) + "\n")
    written = [run_dir / "sweep.jsonl", run_dir / "best.json"]
    targets = [(run_dir / "best" / "model.safetensors", "--run-dir")]
    targets += [(Path(export_best), "--export-best")] if export_best else []
    for path, flag_name in targets:
        written.append(export_model(best, cfg, path, flag_name))
    return written


def export_model(best: Result, cfg: Config, path: Path, flag_name: str = "--export-best") -> Path:
    """The best model as a normal single model: weights at ``path`` and its config.toml beside them.

    ``gpupar predict --weights path`` rebuilds the model from that config.toml (the width
    and seed of this model, the sweep's data settings).
    """
    own = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden=best.member.hidden),
                              optim=dataclasses.replace(cfg.optim, lr=best.member.lr),
                              train=dataclasses.replace(cfg.train, seed=best.member.seed))
    save_weights(best.state, path, flag_name)
    atomic_write_text(path.parent / "config.toml", to_toml(own))
    return path


def check_export_best(out: Path, run_dir: Path, overwrite: bool) -> None:
    """--export-best writes the weights and a config.toml beside them: neither may replace a
    file of another run, nor a config.toml already there (unless --overwrite)."""
    from gpupar.run import rundir
    from gpupar.weights import check_weights_out

    check_weights_out(out, "--export-best")
    rundir.check_not_run_file(out, "--export-best")
    rundir.check_not_in_another_run(out, "--export-best", run_dir)
    beside = out.absolute().parent / "config.toml"
    if beside.exists() and not overwrite and run_dir.absolute() not in beside.parents:
        raise UsageError(f"--export-best {out}: {beside} is there already and the export writes its model's "
                         "config.toml beside the weights; export into a folder of its own, or pass --overwrite")


def main(cfg: Config, args) -> None:
    """`gpupar sweep`: the grid from the flags, trained here or sliced across started ranks
    (each rank trains its own models: no layout, only its share of the grid)."""
    from gpupar import launch
    from gpupar.run import rundir
    from gpupar.models import hidden_width

    if "data.val_fraction" not in vars(args) and cfg.data.val_fraction == 0.0:
        cfg.data.val_fraction = 0.2  # a sweep ranks its models by validation loss
    members = grid(parse_seeds(args.seeds), parse_list(args.sweep_lr, float, "--lr") if args.sweep_lr is not None
                   else [cfg.optim.lr], parse_list(args.sweep_hidden, int, "--hidden")
                   if args.sweep_hidden is not None else [hidden_width(cfg.model)])
    if args.max_fused is not None and args.max_fused < 1:
        raise UsageError(f"--max-fused {args.max_fused} must be a positive integer")
    cfg.train.run_dir = str(rundir.default_path(cfg.train.run_dir, "sweep-"))
    if args.export_best is not None:  # a bad path fails now, not after the training
        check_export_best(Path(args.export_best), Path(cfg.train.run_dir), cfg.train.overwrite)
    extra = ["--seeds", args.seeds]
    for flag_name, value in (("--lr", args.sweep_lr), ("--hidden", args.sweep_hidden),
                             ("--max-fused", args.max_fused), ("--export-best", args.export_best)):
        if value is not None:
            extra += [flag_name, str(value)]
    # Each rank trains its own share of the grid: the ranks are replicas, not one layout.
    launch.run(cfg, "sweep", lambda topo, run: _sweep_here(cfg, members, topo, run.path, args), extra, replicas=True)


def _sweep_here(cfg: Config, members: list[Member], topo: Topology, run_dir: Path, args) -> None:
    sweep = run_sweep(cfg, members, topo, args.max_fused, log=print if topo.is_main else lambda _: None)
    if topo.is_main:
        print(table(sweep.results))
        write_outputs(sweep, cfg, run_dir, args.export_best)
        b = sweep.best.member
        print(f"{len(sweep.results)} models in {sweep.chunks} fused chunk(s), {sweep.wall_time:.2f} s on "
              f"{topo.device}; best: model {b.index} (seed {b.seed}, lr {b.lr:g}, hidden {b.hidden})")
        print(f"Saved sweep to {run_dir}/ (sweep.jsonl, best.json, best/model.safetensors)"
              + (f"; best model exported to {args.export_best}" if args.export_best else ""))

