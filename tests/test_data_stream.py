"""Issue 22: an IterableDataset trains the model the same samples would as tensors, one pass
an epoch; --max-steps bounds an endless stream; bad streams are one line (UsageError).
In-process, one device (the rank-level checks are tests/test_data_ranks.py)."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import gpupar
from gpupar.data import synthetic_regression
from gpupar.errors import UsageError

X, Y = synthetic_regression(200, seed=3)


class Stream(IterableDataset):
    def __init__(self, items=None):
        self.items = items

    def __iter__(self):
        return iter(self.items) if self.items is not None else ({"x": X[i], "y": Y[i]} for i in range(len(X)))


class Endless(IterableDataset):
    def __iter__(self):
        for i in itertools.count():
            yield X[i % len(X)], Y[i % len(X)]


def _train(data, epochs=4, **train):
    torch.manual_seed(0)
    cfg = gpupar.Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress, cfg.train.log_every = epochs, 50, False, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return gpupar.train(gpupar.SimpleNN(), data, config=cfg)


def test_a_stream_with_or_without_workers_trains_the_tensor_model_bit_for_bit():
    ref = _train((X, Y)).model.state_dict()
    for name, data in (("stream", Stream()), ("DataLoader, 2 workers", DataLoader(Stream(), batch_size=50,
                                                                                   num_workers=2))):
        result = _train(data)
        assert [r["step"] for r in result.history.records] == [4, 8, 12, 16], name  # an epoch is one pass
        for key in ref:
            torch.testing.assert_close(result.model.state_dict()[key], ref[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_max_steps_bounds_an_endless_stream():
    result = _train(Endless(), epochs=1, max_steps=7)
    assert result.history.records[-1]["step"] == 7


BAD = [
    ("no batch size", Stream(), {"batch_size": None}, "needs a batch size"),
    ("empty", Stream([]), {}, "yielded no samples in epoch 1"),
    ("short", Stream([(X[0], Y[0])] * 10), {}, "10 samples, fewer than one global batch of 50"),
    ("None item", Stream([(X[0], Y[0])] * 60 + [None] * 40), {}, "sample 60 of the stream is None"),
    ("mixed structure", Stream([(X[0], Y[0])] * 10 + [{"x": X[0], "y": Y[0]}] * 90), {},
     "stream samples 0..49 do not collate"),
]


@pytest.mark.parametrize("name,data,train,message", BAD, ids=[b[0] for b in BAD])
def test_bad_streams_are_one_line(name, data, train, message):
    with pytest.raises(UsageError, match=message) as info:
        _train(data, **train)
    assert "\n" not in str(info.value)


def test_a_bad_sample_in_a_worker_is_one_line_too():
    with pytest.raises(UsageError, match="sample 60 of the stream is None") as info:
        _train(DataLoader(Stream([(X[0], Y[0])] * 60 + [None] * 40), batch_size=50, num_workers=1))
    assert "\n" not in str(info.value)
