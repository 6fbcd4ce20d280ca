"""gpupar sweep: a grid of seeds x learning rates x widths trained as one fused program
(``grid``: the grid, its chunks and outputs; ``fused``: many models as one)."""

from gpupar.sweep.grid import Member, chunks, grid, main, parse_list, parse_seeds, run_sweep, shard, train_chunk

__all__ = ["Member", "chunks", "grid", "main", "parse_list", "parse_seeds", "run_sweep", "shard", "train_chunk"]
