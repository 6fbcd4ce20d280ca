"""The classic example as a plain PyTorch loop on one process (examples/own_loop.py is this
loop under gpupar.setup: a test holds the two within 6 changed lines)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpupar import SimpleNN
from gpupar.data import synthetic_regression

torch.manual_seed(0)
X, y = synthetic_regression(1000)
loader = DataLoader(TensorDataset(X, y), batch_size=1000)
model = SimpleNN()
criterion = nn.MSELoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

for epoch in range(100):
    for inputs, targets in loader:
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if (epoch + 1) % 20 == 0:
        print(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")
