"""Models: the built-in ones (the classic SimpleNN, an MLP, a small GPT), user factories, and
each model's spec."""

from gpupar.models.builtin import SimpleNN, build_model, check_shapes, hidden_width, mlp, model_spec
from gpupar.models.spec import ModelSpec

__all__ = ["ModelSpec", "SimpleNN", "build_model", "check_shapes", "hidden_width", "mlp", "model_spec"]
