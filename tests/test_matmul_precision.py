"""callbacks.Float32MatmulPrecision: sets torch's float32 matmul precision for a fit and restores it."""

import pytest
import torch

from callbacks import Float32MatmulPrecision
from tests.helpers.trainers import quiet_trainer


def test_precision_holds_during_the_fit_and_is_restored(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    seen = []

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            seen.append(torch.get_float32_matmul_precision())
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    before = torch.get_float32_matmul_precision()
    data = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[Float32MatmulPrecision("medium")])
    trainer.fit(Model(), data)
    assert seen == ["medium", "medium"]
    assert torch.get_float32_matmul_precision() == before


def test_bad_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"one of \['highest', 'high', 'medium'\], got 'tf32'"):
        Float32MatmulPrecision("tf32")
