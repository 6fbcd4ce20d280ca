"""Model factories that the tests load by import path (--model user_models:NAME)."""

import torch
from torch import nn


def wide_input():
    """Expects 3 input features: a shape mismatch for the 10-feature classic data."""
    return nn.Linear(3, 1)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))


class GoesNaN(nn.Module):
    """Produces NaN from its 6th forward pass on (a bad batch, as far as training can tell)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.fc(x)
        return out * float("nan") if self.calls > 6 else out


def goes_nan():
    return GoesNaN()


def not_a_module():
    return 42


class FailsOnRank1(nn.Module):
    """Raises on rank 1 at its 4th forward pass, like a bad batch on one worker."""

    def __init__(self, hang: bool = False):
        super().__init__()
        self.fc = nn.Linear(10, 1)
        self.calls, self.hang = 0, hang

    def forward(self, x):
        import os
        import time

        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 4:
            if self.hang:
                time.sleep(3600)
            raise RuntimeError("injected failure on rank 1")
        return self.fc(x)


def fails_on_rank1():
    return FailsOnRank1()


def hangs_on_rank1():
    return FailsOnRank1(hang=True)


def differs_on_rank1():
    """Rank 1 builds a wider hidden layer: the pre-flight check must catch it."""
    import os

    hidden = 51 if os.environ.get("RANK") == "1" else 50
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class Killable(nn.Module):
    """SIGKILLs itself on rank 1 at the forward pass named by $TEST_KILL_RANK1_AT, on the
    first attempt only ($TEST_KILL_ALWAYS=1: on every attempt), like a preempted worker."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 1)
        self.calls = 0

    def forward(self, x):
        import os
        import signal

        self.calls += 1
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" or os.environ.get("TEST_KILL_ALWAYS")
        if (os.environ.get("RANK") == "1" and first_attempt
                and self.calls == int(os.environ.get("TEST_KILL_RANK1_AT", "0"))):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.fc2(torch.tanh(self.fc1(x)))


def killable():
    return Killable()


class KillAt(nn.Module):
    """Killable's SIGKILL as a parameter-free layer: inside an nn.Sequential it rides with the
    last Linear, so under --pp 2 it runs on rank 1's stage (a stage copy runs real Python,
    where a traced forward would have baked the check away)."""

    calls = 0

    def forward(self, x):
        import os
        import signal

        self.calls += 1
        if (os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
                and self.calls == int(os.environ.get("TEST_KILL_RANK1_AT", "0"))):
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def killable_stages():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 1), KillAt())


class NonFiniteAt(nn.Module):
    """Finite forward passes, but at the 4th one (step 3, after the shape check) NaN appears in
    the gradients ($TEST_NAN=grad, the default) or in the loss on rank 1 only ($TEST_NAN=loss-rank1)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)
        self.calls = 0

    def forward(self, x):
        import os

        self.calls += 1
        out = self.fc(x)
        if self.calls == 4:
            if os.environ.get("TEST_NAN", "grad") == "grad":
                out.register_hook(lambda g: g * float("nan"))  # loss stays finite, gradients do not
            elif os.environ.get("RANK") == "1":
                out = out * float("nan")
        return out


def non_finite_at_step3():
    return NonFiniteAt()


class MeanOverOutputs(nn.Module):
    def forward(self, x):  # [batch, k] -> [batch, 1]
        return x.mean(1, keepdim=True)


def even_mlp():
    """Every parameter's first dim divides by 2 and 4, so FSDP shards split it exactly evenly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4),
                         MeanOverOutputs())


def raises():
    """A factory with a bug: gpupar must name it and the exception in one line."""
    raise KeyError("no_such_layer")


def needs_args(in_features, width=8):
    """A factory that needs an argument gpupar cannot give."""
    return nn.Linear(in_features, width)


class TermsItself(nn.Module):
    """Sends SIGTERM to its own process at its 3rd forward pass, like `kill PID` mid-training."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 1)
        self.calls = 0

    def forward(self, x):
        import os
        import signal

        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.fc(x)


def terms_itself():
    return TermsItself()


class BatchNormDropout(nn.Module):
    """Not a Sequential: BatchNorm (running-stat buffers) and Dropout (RNG) between two Linears."""

    def __init__(self, n_in: int = 10):
        super().__init__()
        self.inp, self.norm, self.drop, self.out = nn.Linear(n_in, 32), nn.BatchNorm1d(32), nn.Dropout(0.1), \
            nn.Linear(32, 1)

    def forward(self, x):  # [batch, n_in] -> [batch, 1]
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))))


def batchnorm_dropout():
    return BatchNormDropout()


class Block(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, added back (a pre-norm residual block)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):  # [batch, width] -> [batch, width]
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    """An input Linear, an nn.ModuleList of residual blocks and a head: not a Sequential."""

    def __init__(self, in_features=10, width=32, blocks=4, out_features=1, norm=None):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.bn = norm(width) if norm else None
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, out_features)

    def forward(self, x):
        h = self.inp(x)
        if self.bn is not None:
            h = self.bn(h)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def residual_mlp():
    """Its loss oscillates between ~1 and ~20 with Adam at lr 0.01 (full batch): chaotic but correct."""
    torch.manual_seed(0)
    return ResidualMLP()


def batchnorm_mlp():
    """BatchNorm1d after the input layer: batch statistics, running buffers."""
    torch.manual_seed(0)
    return ResidualMLP(blocks=2, norm=nn.BatchNorm1d)


def dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


class Branchy(ResidualMLP):
    """A forward whose control flow depends on the data: torch.export cannot trace it for --pp."""

    def forward(self, x):
        h = self.inp(x)
        if h.sum() > 0:
            h = h * 2
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def branchy():
    return Branchy()


class ReadsHidden(nn.Module):
    """fc1 -> ReLU -> fc2, plus a skip that reads fc1's features whole (their mean): column-
    sharded, fc1 would hand the mean one rank's slice, and the run would train another model."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 32), nn.Linear(32, 1)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h.mean(-1, keepdim=True)


def reads_hidden():
    torch.manual_seed(0)
    return ReadsHidden()


class PartlyShardable(ReadsHidden):
    """ReadsHidden's features, then a sound up/GELU/down pair with a residual, then a head."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(32, 16)
        self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.fc2(h) + h.mean(-1, keepdim=True)
        return self.head(h + self.down(nn.functional.gelu(self.up(h))))


def partly_shardable():
    torch.manual_seed(0)
    return PartlyShardable()


class TiedBlocks(ResidualMLP):
    """Residual blocks 0 and 2 share one up-projection (weight and bias: tied weights, as in
    ALBERT or a tied embedding/head), and two buffers: a fixed input scale and a forward
    counter that training updates (a pipeline's micro-batches call forward more often)."""

    def __init__(self):
        super().__init__(blocks=3)
        self.blocks[2].up.weight = self.blocks[0].up.weight
        self.blocks[2].up.bias = self.blocks[0].up.bias
        self.register_buffer("in_scale", torch.linspace(0.5, 1.5, 10))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return super().forward(x * self.in_scale)


def tied_blocks():
    torch.manual_seed(0)
    return TiedBlocks()


def tied_pair():
    """Linear layers 2 and 4 (16 x 16) share one weight: the auto TP plan would shard layer 2
    by rows and layer 4 by columns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 1))
    model[4].weight = model[2].weight
    return model


class HalvedLinear(nn.Linear):
    """An nn.Linear whose own forward halves its weight first: still a Linear to the TP plan."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight * 0.5, self.bias)


def halved_blocks():
    """ResidualMLP whose up-projections are HalvedLinear: a traced stage runs a mul before the
    linear, so swapping the layer for a plain nn.Linear would drop the halving."""
    torch.manual_seed(0)
    model = ResidualMLP(blocks=2)
    for block in model.blocks:
        block.up = HalvedLinear(32, 64)
    return model


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al., 2016): conv-BN-ReLU-conv-BN, added to the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H, W]
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetStyle(nn.Module):
    """A ResNet-18-shaped stem and stages, small: conv + BatchNorm + ReLU, 3x3 max pooling
    (whose near-ties flip under rounding), two stages of basic blocks, average pooling and a
    head. It takes the classic example's flat features as an image: [B, 3*8*8] -> [B, 3, 8, 8].
    Written here because torchvision cannot be installed beside CPU torch 2.13."""

    def __init__(self, channels: int = 8, out_features: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Unflatten(1, (3, 8, 8)), nn.Conv2d(3, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1))
        self.layer1 = nn.Sequential(BasicBlock(channels), BasicBlock(channels))
        self.layer2 = nn.Sequential(BasicBlock(channels))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_features))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


def resnet_style():
    """Train with --features 192 (a 3x8x8 image per sample)."""
    torch.manual_seed(0)
    return ResNetStyle()
