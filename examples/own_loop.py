"""The classic loop (examples/classic_loop.py) under gpupar.setup, 6 lines changed:

    gpupar run --nproc-per-node 2 [--strategy fsdp] examples/own_loop.py
    torchrun --nproc-per-node 2 examples/own_loop.py     (GPUPAR_STRATEGY=fsdp for FSDP)
    gpupar verify --strategy ddp --nproc-per-node 2 -- python examples/own_loop.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpupar import SimpleNN, setup
from gpupar.data import synthetic_regression

torch.manual_seed(0)
gp = setup()  # the strategy: setup(strategy=...), or GPUPAR_STRATEGY (ddp by default)
X, y = synthetic_regression(1000)
loader = gp.setup_dataloader(DataLoader(TensorDataset(X, y), batch_size=1000))
model = SimpleNN()
criterion = nn.MSELoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
model, optimizer = gp.setup(model, optimizer)

for epoch in range(100):
    for inputs, targets in loader:
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        optimizer.zero_grad()
        gp.backward(loss)
        optimizer.step()
    if (epoch + 1) % 20 == 0:
        gp.print(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")
