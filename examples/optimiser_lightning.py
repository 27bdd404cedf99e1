"""The tuning optimiser in PyTorch Lightning, with manual optimisation (needs `pip install lightning`).

Run from the repository root:  python examples/optimiser_lightning.py

Lightning's automatic optimisation calls backward() itself and hands the optimiser a closure that
returns the loss after it; optim.Implicit differentiates the loss itself (the last step of every
window twice more), so the module optimises manually: training_step passes the closure that
returns the batch's loss to the optimiser's step. Lightning's checkpoints hold its state_dict.
"""
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # the repository's modules
from onepass import optim


class Regressor(L.LightningModule):
    def __init__(self, validation: DataLoader):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
        self.validation = validation

    def loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> optim.Implicit:
        return optim.Implicit(self.net, self.validation, self.loss, lr=1e-2, weight_decay=1e-6, momentum=0.5)

    def training_step(self, batch: list[torch.Tensor], batch_index: int) -> torch.Tensor:
        loss = self.optimizers().step(closure=lambda: self.loss(batch))
        self.log_dict({"loss": loss, "lr": self.optimizers().param_groups[0]["lr"]}, prog_bar=True)
        return loss


torch.manual_seed(0)
x = torch.randn(1200, 5)
y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(1200, 1)
train = DataLoader(TensorDataset(x[:900], y[:900]), batch_size=50, shuffle=True)
validation = DataLoader(TensorDataset(x[900:], y[900:]), batch_size=100, shuffle=True)
module = Regressor(validation)
trainer = L.Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train)
group = module.optimizers().param_groups[0]
with torch.no_grad():
    print(f"lr {group['lr']:.3g}  weight decay {group['weight_decay']:.3g}  momentum {group['momentum']:.3f}  "
          f"validation loss {module.loss((x[900:], y[900:])).item():.4f}")
