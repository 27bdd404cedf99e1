"""Your own training loop with a DataLoader; the optimiser tunes lr, weight decay and momentum as it goes.

Run from the repository root:  python examples/optimiser_loop.py

optim.Implicit is a torch.optim.Optimizer: SGD with momentum and weight decay whose hyperparameters
follow the implicit hypergradient of the validation loss after every 10 steps (the paper's method).
Its step() takes a closure that returns the batch's loss (it differentiates the loss itself, so no
backward() and no clip_grad_norm_ in the loop: clipping is its gradient_clip argument).
"""
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # the repository's modules
from onepass import optim

torch.manual_seed(0)
x = torch.randn(1200, 5)
y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(1200, 1)
train = DataLoader(TensorDataset(x[:900], y[:900]), batch_size=50, shuffle=True)
validation = DataLoader(TensorDataset(x[900:], y[900:]), batch_size=100, shuffle=True)
model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
loss_fn = nn.functional.mse_loss
with torch.no_grad():
    before = loss_fn(model(x[900:]), y[900:]).item()


def validation_loss(batch: list[torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return loss_fn(model(inputs), targets)


optimiser = optim.Implicit(model, validation, validation_loss, lr=1e-2, weight_decay=1e-6, momentum=0.5,
                           gradient_clip=10.0)
for epoch in range(20):
    for inputs, targets in train:
        loss = optimiser.step(lambda: loss_fn(model(inputs), targets))     # noqa: B023 (called at once)
    if epoch % 5 == 4:
        group = optimiser.param_groups[0]
        print(f"epoch {epoch + 1}: training loss {loss.item():.4f}  lr {group['lr']:.3g}  "
              f"weight decay {group['weight_decay']:.3g}  momentum {group['momentum']:.3f}")
with torch.no_grad():
    print(f"validation loss {before:.4f} -> {loss_fn(model(x[900:]), y[900:]).item():.4f}")
