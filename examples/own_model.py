"""Tune lr, weight decay and momentum of your own network while it trains (Ours_LR_Momentum).

Run from the repository root:  python examples/own_model.py
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # the repository's modules
import onepass


class Net(nn.Module):
    """A small residual regressor: y = f(x) for 5 input features."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(5, 32), nn.Linear(32, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))) + x[:, :1]


torch.manual_seed(0)
x = torch.randn(800, 5)
y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(800, 1)
train, validation, test = (x[:500], y[:500]), (x[500:650], y[500:650]), (x[650:], y[650:])
model, loss = Net(), nn.functional.mse_loss
before = loss(model(validation[0]), validation[1]).item()
result = onepass.tune(model, loss, train, validation, "Ours_LR_Momentum", test=test,
                      lr=1e-3, weight_decay=1e-6, momentum=0.5, hyperparameter_steps=300, seed=0)
print("learned: " + "  ".join(f"{name} {value:.4g}" for name, value in result.hyperparameters.items()))
print(f"validation loss: {before:.4f} -> {result.metrics['final']['Loss/Validation']:.4f}  "
      f"test loss {result.metrics['final']['Loss/Test']:.4f}  ({result.status})")
