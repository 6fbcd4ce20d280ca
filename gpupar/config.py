"""Typed run configuration, layered defaults < TOML file < CLI flags.

Every field carries a one-line help string in its metadata; the CLI builds its flags
from these dataclasses, so a field added here is a flag, a TOML key and a line in
``--print-config`` at once. Validation happens once, here, at the edge.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gpupar.errors import UsageError


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, flag: str | None = None) -> Any:
    """A dataclass field with its help text, its accepted values (when a closed set) and its
    CLI flag when that is not ``--field-name``."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # the modes of --activation-checkpointing
LOSSES = ("mse", "l1", "huber", "cross-entropy")  # --loss by name (training.recipe builds them)


@dataclass
class ModelConfig:
    name: str = opt("simple-nn", "simple-nn, mlp, gpt, hf:TYPE (a Hugging Face model type, e.g. hf:gpt2, built from "
                    "--hf-config), hf:DIR (a local save_pretrained directory), or package.module:factory", flag="model")
    hidden: int | None = opt(None, "hidden width of the built-in models; none = 50 (simple-nn, mlp) or 64 (gpt)")
    layers: int = opt(2, "number of Linear layers (mlp) or transformer blocks (gpt)")
    heads: int = opt(4, "attention heads (gpt)")
    seq_len: int = opt(32, "sequence length in tokens (gpt, hf:)")
    vocab: int = opt(64, "vocabulary size (gpt)")
    hf_config: str | None = opt(None, "hf: models: config fields as key=value,... (n_layer=2,n_embd=64,vocab_size=256)")


@dataclass
class DataConfig:
    data: str | None = opt(None, "path to .csv, .npz (arrays X, y), .pt (dict of X, y), a token file (.bin, .u16, "
                           ".u32: windows of --seq-len), a datasets directory or .parquet / .jsonl / .arrow (extra: "
                           "data), or package.module:factory returning tensors, a Dataset, an "
                           "IterableDataset or a DataLoader; none = synthetic")
    target: str | None = opt(None, "target column of a CSV file")
    task: str = opt("regression", "sets the default loss", ("regression", "classification"))
    samples: int = opt(1000, "number of synthetic samples")
    features: int = opt(10, "number of synthetic features")
    noise: float = opt(0.1, "std of the Gaussian noise added to the synthetic target")
    val_fraction: float = opt(0.0, "fraction of samples held out for validation, in [0, 1)")
    shuffle: bool = opt(False, "reshuffle the training samples every epoch (seeded)")
    token_dtype: str = opt("uint16", "token id type of a .bin token file (.u16 and .u32 files say theirs)",
                           ("uint16", "uint32"))


@dataclass
class OptimConfig:
    optimizer: str = opt("adam", "optimizer", ("adam", "adamw", "sgd"))
    lr: float = opt(0.01, "peak learning rate")
    weight_decay: float = opt(0.0, "weight decay")
    lr_schedule: str = opt("constant", "learning-rate schedule after warm-up", ("constant", "cosine", "linear"))
    warmup_steps: int = opt(0, "linear warm-up steps from 0 to --lr")
    clip_grad_norm: float | None = opt(None, "clip the global gradient norm to this value")
    optimizer_impl: str = opt("fused", "fused: one kernel per device for adam/adamw/sgd (fastest, no host sync; "
                              "rounds a few ulp apart from torch's default); default: torch's own choice, "
                              "bitwise as a plain torch loop", ("fused", "default"))


@dataclass
class TrainConfig:
    epochs: int = opt(100, "passes over the training data")
    batch_size: int | None = opt(None, "global batch size in samples; none = full batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (the batch is split into them)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    precision: str = opt("fp32", "autocast precision", ("fp32", "bf16", "fp16"))
    loss: str | None = opt(None, "loss: mse, l1, huber, cross-entropy, or package.module:function called as "
                           "function(output, batch); none = the model's own, else mse (regression) or "
                           "cross-entropy (classification)", flag=None)
    seed: int = opt(42, "seed for data, weight init and shuffling")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    log_every: int = opt(20, "print and record the loss every N epochs")
    run_dir: str | None = opt(None, "where to write config, metrics and weights; none = runs/<timestamp>")
    overwrite: bool = opt(False, "replace the run already in --run-dir (its files are moved aside, into "
                          ".replaced-<id>, and deleted once this run succeeds); without it such a directory is refused")
    progress: bool = opt(True, "show a progress bar when stderr is a terminal")
    compile: bool = opt(False, "torch.compile the model (inductor; the first steps compile)")
    cuda_graphs: bool = opt(False, "CUDA only, for small models with static shapes: one GPU captures the whole "
                            "step as one CUDA graph; across ranks, compile's reduce-overhead mode")


@dataclass
class ParallelConfig:
    strategy: str = opt("single", "shorthand for the layout: ddp replicates over the data-parallel ranks, fsdp "
                        "shards over them, hsdp does both, tp/pp take the ranks --dp leaves; --dp/--tp/--pp "
                        "alone also start ranks (data parallel beside --tp/--pp is fsdp)",
                        ("single", "dp", "ddp", "fsdp", "hsdp", "tp", "pp", "layer-split"))
    nproc_per_node: int | None = opt(None, "ranks to start on this node; none = local GPU count (required on CPU)")
    nnodes: int = opt(1, "number of nodes")
    node_rank: int | None = opt(None, "this node's rank; none = 0 (or SLURM_NODEID)")
    rdzv_endpoint: str | None = opt(None, "host:port of the c10d rendezvous; none = 127.0.0.1 with a free port")
    timeout: float = opt(120.0, "seconds before a stuck collective or rendezvous fails the job")
    max_restarts: int = opt(0, "times TorchElastic restarts all workers after a failure")
    ddp_bucket_mb: float = opt(25.0, "DDP gradient bucket size in MiB")
    ddp_static_graph: bool = opt(False, "tell DDP the graph is the same every step (enables more overlap)")
    ddp_comm_hook: str = opt("none", "compress gradients before the all-reduce", ("none", "fp16", "bf16"))
    reshard_after_forward: bool = opt(True, "fsdp/hsdp: free gathered parameters after forward (ZeRO-3); "
                                      "false keeps them for backward (ZeRO-2-like)")
    cpu_offload: bool = opt(False, "fsdp/hsdp: keep sharded parameters, gradients and optimizer state in CPU memory")
    dp_replicate: int | None = opt(None, "hsdp: replicate degree R; none = world size / --dp-shard")
    dp_shard: int | None = opt(None, "hsdp: shard degree S (R x S = world size); none = ranks per node")
    fsdp_blocks: str = opt("auto", "fsdp/hsdp units sharded before the root: auto (children of a Sequential or "
                           "ModuleList, transformer layers, large Linear layers), none, or class names A,B")
    fsdp_min_params: int = opt(100_000, "fsdp/hsdp auto: a Linear layer with this many parameters is its own unit")
    dp: int | None = opt(None, "data-parallel degree; none = world size / (tp x pp)")
    tp: int = opt(1, "tensor-parallel degree (ranks that split each layer's weights)")
    pp: int = opt(1, "pipeline-parallel degree (ranks that each hold consecutive layers)")
    microbatches: int | None = opt(None, "pipeline micro-batches per step; none = 2 x pp")
    schedule: str = opt("1f1b", "pipeline schedule", ("gpipe", "1f1b", "interleaved-1f1b",
                                                        "interleaved-zb", "zbv", "dualpipev"))
    stages_per_rank: int = opt(2, "pipeline stages per rank with the interleaved schedules (2 for zbv, dualpipev)")
    split_points: str | None = opt(None, "pipeline/layer-split stage starts as layer indices, e.g. 2,5; "
                                         "none = balanced by parameter count")
    devices: str | None = opt(None, "devices for --strategy layer-split, in layer order, e.g. cuda:0,cuda:1")
    activation_checkpointing: str = opt("none", "recompute activations in backward, per block: full keeps only "
                                        "each block's input, selective also keeps matmul and attention outputs",
                                        ACTIVATION_CHECKPOINTING)
    plan: str | None = opt(None, "auto: let gpupar plan pick the fastest layout that fits (with --nproc-per-node "
                           "ranks) and run it", ("auto",))
    device_memory: str | None = opt(None, "memory per rank for --plan auto, e.g. 80GiB; none = the device's "
                                    "(on CPU: RAM / ranks)")
    sync_bn: bool = opt(False, "data-parallel layouts: BatchNorm layers normalise over the global batch "
                        "(SyncBatchNorm), as on one device, instead of over each rank's slice")


@dataclass
class CheckpointConfig:
    checkpoint_every: int | None = opt(None, "write a distributed checkpoint to RUN/checkpoints/step-N/ every N steps")
    keep_last: int = opt(3, "complete checkpoints to keep (>= 2); older ones are pruned after each new commit")
    resume: str | None = opt(None, "continue from a checkpoint: auto (newest complete one in --run-dir) or a PATH")
    on_nan: str = opt("stop", "on NaN/Inf in the loss or gradients: stop with an error, or skip the step on all "
                      "ranks", ("stop", "skip"))


@dataclass
class TrackConfig:
    track: str = opt("none", "experiment tracking on rank 0 (metrics.jsonl is always written)",
                     ("none", "tensorboard", "mlflow"))
    mlflow_uri: str | None = opt(None, "MLflow tracking URI; none = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
    experiment: str = opt("gpupar", "MLflow experiment name")
    track_timeout: float = opt(30.0, "seconds the tracker may take to answer (refused or silent: one warning, "
                               "training goes on); training never waits on it but at the end, for at most this")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> "Config":
        """Check every field once; raise a UsageError naming the field and what is accepted."""
        for section in dataclasses.fields(self):
            group = getattr(self, section.name)
            for f in dataclasses.fields(group):
                value = getattr(group, f.name)
                choices = f.metadata.get("choices")
                if choices and value is not None and value not in choices:
                    raise UsageError(f"{flag(f)} {value!r} is not one of: {', '.join(choices)}")
        positive = {"epochs": self.train.epochs, "grad_accum": self.train.grad_accum,
                    "log_every": self.train.log_every, "samples": self.data.samples,
                    "features": self.data.features, "layers": self.model.layers,
                    "nnodes": self.parallel.nnodes}
        if self.model.hidden is not None:
            positive["hidden"] = self.model.hidden
        for optional in ("batch_size", "max_steps"):
            if getattr(self.train, optional) is not None:
                positive[optional] = getattr(self.train, optional)
        if self.parallel.nproc_per_node is not None:
            positive["nproc_per_node"] = self.parallel.nproc_per_node
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{flag(name)} {value} must be a positive integer")
        if not (self.optim.lr > 0 and math.isfinite(self.optim.lr)):
            raise UsageError(f"--lr {self.optim.lr} must be a positive finite number")
        if not (0 <= self.train.seed <= MAX_SEED):  # torch.manual_seed and the shuffle seed must not overflow
            raise UsageError(f"--seed {self.train.seed} is out of range; accepted: 0 to {MAX_SEED} (2**32 - 1)")
        for name, value in (("weight_decay", self.optim.weight_decay), ("noise", self.data.noise)):
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{flag(name)} {value} must be a finite number >= 0")
        for name, value in (("lr", self.optim.lr), ("weight_decay", self.optim.weight_decay)):
            if value > FLOAT32_MAX:  # the optimizers compute in float32: a larger factor overflows
                raise UsageError(f"{flag(name)} {value} is too large; accepted: at most {FLOAT32_MAX:.4g}")
        if self.model.name == "gpt":
            for name in ("heads", "vocab", "seq_len"):
                if getattr(self.model, name) < 1:
                    raise UsageError(f"{flag(name)} {getattr(self.model, name)} must be a positive integer "
                                     "(--model gpt)")
        if self.train.loss is not None and self.train.loss not in LOSSES and ":" not in self.train.loss:
            raise UsageError(f"--loss {self.train.loss!r} is not one of: {', '.join(LOSSES)}, "
                             "or package.module:function")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.data.val_fraction} must be in [0, 1)")
        if self.optim.warmup_steps < 0:
            raise UsageError(f"--warmup-steps {self.optim.warmup_steps} must be >= 0")
        if self.optim.clip_grad_norm is not None and not 0 < self.optim.clip_grad_norm < math.inf:
            raise UsageError(f"--clip-grad-norm {self.optim.clip_grad_norm} must be > 0")
        if self.parallel.max_restarts < 0:
            raise UsageError(f"--max-restarts {self.parallel.max_restarts} must be >= 0")
        if not 0 < self.parallel.ddp_bucket_mb < float("inf"):  # nan fails this too (it started ranks, then exit 1)
            raise UsageError(f"--ddp-bucket-mb {self.parallel.ddp_bucket_mb} must be a finite number > 0")
        p = self.parallel
        for name in ("tp", "pp", "stages_per_rank") + (("dp",) if p.dp is not None else ()) + \
                (("microbatches",) if p.microbatches is not None else ()):
            if getattr(p, name) < 1:
                raise UsageError(f"{flag(name)} {getattr(p, name)} must be a positive integer")
        if p.strategy == "layer-split" and not p.devices:
            raise UsageError("--strategy layer-split needs --devices, for example cpu,cpu or cuda:0,cuda:1")
        if self.checkpoint.checkpoint_every is not None and self.checkpoint.checkpoint_every < 1:
            raise UsageError(f"--checkpoint-every {self.checkpoint.checkpoint_every} must be a positive integer")
        if self.checkpoint.keep_last < 2:
            raise UsageError(f"--keep-last {self.checkpoint.keep_last} must be >= 2 (the newest complete "
                             "checkpoint is never deleted, and one more guards against a bad newest one)")
        if not 0 < self.parallel.timeout < float("inf"):  # nan and inf reached the rendezvous as a traceback
            raise UsageError(f"--timeout {self.parallel.timeout} must be a finite number > 0 seconds")
        if not 0 < self.track.track_timeout < float("inf"):
            raise UsageError(f"--track-timeout {self.track.track_timeout} must be a finite number > 0 seconds")
        layout(self.parallel)  # a combination the layout cannot honour fails here, once
        return self


@dataclass(frozen=True)
class Layout:
    """The parallel layout the flags ask for: ``--strategy`` translated, once, into degrees.

    ``--strategy`` is shorthand: ``ddp`` replicates over the data-parallel ranks, ``fsdp``
    shards over them, ``hsdp`` does both, and ``tp`` / ``pp`` set their degree. Nothing else
    reads the string. The world size is known only at launch, so a degree of None takes the
    ranks the others leave (``topology.ParallelDims.resolve`` makes the degrees concrete).
    """

    process: str
    """"ranks" (one process per rank), or a one-process layout: "one-device", "dataparallel",
    "layer-split"."""
    dp_mode: str = "replicate"
    """How the data-parallel ranks hold the model: "replicate" (DDP), "shard" (FSDP), "hybrid" (HSDP)."""
    dp: int | None = 1
    tp: int | None = 1
    pp: int | None = 1
    dp_replicate: int | None = None
    dp_shard: int | None = None

    @property
    def ranks(self) -> bool:
        return self.process == "ranks"


def layout(p: ParallelConfig) -> Layout:
    """Translate ``--strategy`` and the degrees into one Layout; refuse what it cannot honour."""
    s = p.strategy
    model_parallel = p.tp > 1 or p.pp > 1 or s in ("tp", "pp")
    data_parallel = (p.dp or 1) > 1
    if s != "hsdp":
        for name in ("dp_replicate", "dp_shard"):
            if getattr(p, name) is not None:
                raise UsageError(f"{flag(name)} needs --strategy hsdp (got {s})")
    for name in ("dp_replicate", "dp_shard"):
        if getattr(p, name) is not None and getattr(p, name) < 1:
            raise UsageError(f"{flag(name)} {getattr(p, name)} must be a positive integer")
    if p.cpu_offload and s not in ("fsdp", "hsdp"):
        raise UsageError(f"--cpu-offload needs --strategy fsdp or hsdp (got {s})")
    if s in ("dp", "layer-split"):
        if model_parallel or data_parallel:
            raise UsageError(f"--strategy {s} runs in one process and takes no --dp/--tp/--pp; "
                             "use --strategy fsdp (or ddp) with ranks")
        if s == "layer-split" and not p.devices:
            raise UsageError("--strategy layer-split needs --devices, for example cpu,cpu or cuda:0,cuda:1")
        return Layout("dataparallel" if s == "dp" else "layer-split")
    if s == "single" and not (model_parallel or data_parallel):
        return Layout("one-device")
    if s == "ddp" and model_parallel:
        given = " ".join(f"--{name} {getattr(p, name)}" for name in ("tp", "pp") if getattr(p, name) > 1)
        raise UsageError(f"--strategy ddp with {given}: DDP cannot hold tensor-parallel (DTensor) parameters "
                         "or pipeline stages; use --strategy fsdp or hsdp for the data-parallel part")
    # Data parallel beside model parallelism shards (FSDP), as torchtitan does: DDP cannot.
    dp_mode = {"ddp": "replicate", "fsdp": "shard", "hsdp": "hybrid"}.get(s, "shard" if model_parallel else "replicate")
    tp = None if s == "tp" and p.tp == 1 else p.tp  # --strategy tp alone: every rank --dp leaves
    pp = None if s == "pp" and p.pp == 1 else p.pp
    if p.dp is not None:
        dp: int | None = p.dp
    elif None in (tp, pp):
        dp = 1  # the model-parallel degree takes the ranks
    else:
        dp = None  # data parallel takes the ranks tp x pp leave
    return Layout("ranks", dp_mode, dp, tp, pp, p.dp_replicate, p.dp_shard)


FLOAT32_MAX = 3.4028234663852886e38
MAX_SEED = 2**32 - 1  # as numpy's seeds; x 1_000_003 + epoch (the shuffle seed) still fits torch's 64 bits


def flag(f: dataclasses.Field | str) -> str:
    """The CLI flag of a field (or of a field name): ``--batch-size`` for ``batch_size``."""
    if isinstance(f, str):
        return "--" + f.replace("_", "-")
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """The scalar type of a field, unwrapping ``X | None``."""
    hint = typing.get_type_hints(_owner_of[f.name])[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def sections() -> list[tuple[str, type]]:
    return [(f.name, f.default_factory) for f in dataclasses.fields(Config)]  # type: ignore[misc]


_owner_of = {f.name: cls for _, cls in sections() for f in dataclasses.fields(cls)}


def as_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)
