"""Issue 22: per rank, the samples each data source gives it, over 2 epochs at world 2, and
where a run interrupted mid-epoch continues, at world 2, 4 and 1.

One torchrun spawn at world 2 (tests/mp_data.py) checks map-style (dict items, and
((x, mask), y) items), tensors with a 1-D target, a DataLoader with 2
workers (shuffled), an IterableDataset with and without __len__ (one with --grad-accum 2, one
with a remainder that does not fill a batch), and a DataLoader with 2 workers over a stream:
disjoint shards that together are the single-device micro-batch, every sample once per epoch.
The same spawn interrupts a shuffled loader and a streamed loader (2 workers each) mid-epoch
and resumes them at world 2; a spawn at world 4 and this process (one device) resume them from
the same checkpoints. Each must continue at the next unseen sample: the interrupted part and
the resumed part together are the uninterrupted single-device run, sample for sample.
"""

import re

import pytest

from harness import TESTS, gpupar

RESUMABLE = ["loader-workers", "iterable-loader-workers"]


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    out = tmp_path_factory.mktemp("data-ranks")
    proc, _ = gpupar("--nproc-per-node", 2, str(TESTS / "mp_data.py"), out, cwd=out,
                     prefix=("-m", "torch.distributed.run"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_every_source_shards_disjointly_into_the_single_device_batches(world_2):
    proc, _ = world_2
    assert re.findall(r"^OK (\S+)$", proc.stdout, re.M) == ["map-style", "tensors-1d-target", "nested",
                                                            "loader-workers", "iterable",
                                                            "iterable-sized-accum", "iterable-loader-workers"]


def test_a_mid_epoch_resume_continues_at_the_same_sample_on_2_4_and_1_ranks(world_2):
    import json

    import mp_data

    proc, out = world_2
    assert re.findall(r"^OK resume-2 (\S+)$", proc.stdout, re.M) == RESUMABLE
    for name in RESUMABLE:  # one device, in this process (no process group)
        first = json.loads((out / f"{name}.json").read_text())
        seen, state = mp_data.resumable_run(name, 1, out / name / "resumed-1",
                                            resume=out / name / "checkpoints" / f"step-{mp_data.STOP}")
        mp_data.check_resumed(name, first, mp_data.merged([seen]), state)
    four, _ = gpupar("--nproc-per-node", 4, str(TESTS / "mp_data.py"), out, "resume", cwd=out,
                     prefix=("-m", "torch.distributed.run"), timeout=300)
    assert four.returncode == 0, four.stdout[-3000:] + four.stderr[-3000:]
    assert re.findall(r"^OK resume-4 (\S+)$", four.stdout, re.M) == RESUMABLE
