"""gpupar: train a plain PyTorch model on one device, many GPUs, many nodes, or many models at once."""

from gpupar.config import Config
from gpupar.models import SimpleNN
from gpupar.training.state import TrainResult
from gpupar.api import train, verify
from gpupar.notebook import notebook_launch
from gpupar.ownloop import setup

__version__ = "0.1.0"
__all__ = ["Config", "SimpleNN", "TrainResult", "notebook_launch", "setup", "train", "verify", "__version__"]
