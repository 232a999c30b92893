"""The native detector as a LightningModule and the model config's test dataset as a LightningDataModule."""
from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader


class DetectorModule(pl.LightningModule):
    """An mmdet/mmyolo detector under Lightning: `test_step` is the detector's own (data preprocessor, then
    predict), so native predictions are exactly what mmengine's test loop gets."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def test_step(self, batch, batch_idx):
        return self.detector.test_step(batch)


class MMDataModule(pl.LightningDataModule):
    """The model config's test dataset and pipeline (built by mmengine's registries in the config's scope).
    Lightning adds a DistributedSampler under DDP; its padding is dropped when the metrics gather results."""

    def __init__(self, mm_cfg):
        super().__init__()
        self.mm_cfg = mm_cfg
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            from mmengine.registry import DATASETS, DefaultScope

            with DefaultScope.overwrite_default_scope(self.mm_cfg.get('default_scope', 'mmyolo')):
                self.dataset = DATASETS.build(self.mm_cfg.test_dataloader.dataset)

    def test_dataloader(self) -> DataLoader:
        from mmengine.dataset import pseudo_collate

        loader = self.mm_cfg.test_dataloader
        return DataLoader(self.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                          shuffle=False, collate_fn=pseudo_collate)
