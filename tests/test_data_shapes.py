"""Issue 22 (first part): data as the user has it trains the same model as (X, y) tensors.

One device, in-process: a Dataset of dicts, a user's DataLoader with 2 workers (its batch_size
is the global batch) and a 1-D target all give the weights of the (X, y[:, None]) run bit for
bit: the same samples in the same order, collated alike.
"""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import gpupar
from gpupar.data import synthetic_regression
from gpupar.errors import UsageError

X, Y = synthetic_regression(200, seed=3)


class Dicts(Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return {"x": X[i], "y": Y[i]}


def _train(data):
    torch.manual_seed(0)
    cfg = gpupar.Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress, cfg.train.log_every = 4, 50, False, 4
    return gpupar.train(gpupar.SimpleNN(), data, config=cfg).model.state_dict()


def test_dicts_a_loader_with_workers_and_a_1d_target_train_the_tensor_model():
    ref = _train((X, Y))
    for name, data in (("dict items", Dicts()), ("DataLoader, 2 workers", DataLoader(Dicts(), batch_size=50,
                                                                                     num_workers=2)),
                       ("1-D target", (X, Y[:, 0]))):
        got = _train(data)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=f"{name}: {key}")


class Lazy(Dataset):
    """10 million samples made on access (the issue's row); none may be made here."""

    def __len__(self):
        return 10_000_000

    def __getitem__(self, i):
        raise AssertionError(f"sample {i} was read: the full batch was being collated")


def test_a_lazy_dataset_of_10_million_samples_without_a_batch_size_is_one_line():
    with pytest.raises(UsageError, match="a Dataset of 10000000 samples needs a batch size") as info:
        gpupar.train(gpupar.SimpleNN(), Lazy())
    assert "\n" not in str(info.value)
