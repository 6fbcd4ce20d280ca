"""Issue 22 (first part): data as the user has it trains the same model as (X, y) tensors.

One device, in-process: a Dataset of dicts, a user's DataLoader with 2 workers (its batch_size
is the global batch) and a 1-D target all give the weights of the (X, y[:, None]) run bit for
bit: the same samples in the same order, collated alike.
"""

import torch
from torch.utils.data import DataLoader, Dataset

import gpupar
from gpupar.data import synthetic_regression

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
