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
