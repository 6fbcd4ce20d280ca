"""Issue 22: per rank, the samples each data source gives it, over 2 epochs at world 2.

One torchrun spawn (tests/mp_data.py) checks map-style, a DataLoader with 2 workers (shuffled),
an IterableDataset with and without __len__ (one with --grad-accum 2, one with a remainder
that does not fill a batch), and a DataLoader with 2 workers over a stream: disjoint shards
that together are the single-device micro-batch, every sample once per epoch.
"""

import re

from harness import TESTS, gpupar


def test_every_source_shards_disjointly_into_the_single_device_batches(tmp_path):
    proc, _ = gpupar("--nproc-per-node", 2, str(TESTS / "mp_data.py"), cwd=tmp_path,
                     prefix=("-m", "torch.distributed.run"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.findall(r"^OK (\S+)", proc.stdout, re.M) == ["map-style", "loader-workers", "iterable",
                                                           "iterable-sized-accum", "iterable-loader-workers"]
