"""A user's own process group: the script calls init_process_group itself (here under
torchrun, then hides torchrun's variables), and gpupar.setup must join that group, not
start another. Then it runs the example loop as written."""

import os
import runpy
import sys

import torch.distributed as dist

dist.init_process_group("gloo")
group = dist.group.WORLD
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
    os.environ.pop(name)  # gpupar.setup sees the group only, as under a framework that keeps no variables
runpy.run_path(sys.argv[1], run_name="__main__")
assert dist.group.WORLD is group, "gpupar.setup replaced the user's process group"
print(f"OK own process group, rank {dist.get_rank()}")
