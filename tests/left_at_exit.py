"""Run a script (sys.argv[1]) as torchrun runs it, then report at exit whether the process
group is gone. Many scripts end without destroy_process_group; gpupar, which joined the group
for them, leaves it at exit (gloo's threads torn down at interpreter exit abort a finished rank,
pytorch/pytorch#190489). This handler is registered first, so it runs after gpupar's."""

import atexit
import runpy
import sys

import torch.distributed as dist

atexit.register(lambda: print(f"OK left the process group at exit: {not dist.is_initialized()}", flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
