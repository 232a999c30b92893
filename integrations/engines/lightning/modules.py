"""The native detector as a LightningModule and the model config's test dataset as a LightningDataModule."""
from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from integrations.engines.prefetch import PrefetchLoader


class DetectorModule(pl.LightningModule):
    """An mmdet/mmyolo detector under Lightning: `test_step` is the detector's own (data preprocessor, then
    predict), so native predictions are exactly what mmengine's test loop gets; with `native=False` (nothing
    compares with the native model) the forward is skipped and the batch's own data samples pass on."""

    def __init__(self, detector, native: bool = True):
        super().__init__()
        self.detector = detector
        self.native = native

    def test_step(self, batch, batch_idx):
        return self.detector.test_step(batch) if self.native else batch['data_samples']


class MMDataModule(pl.LightningDataModule):
    """The model config's test dataset and pipeline (built by mmengine's registries in the config's scope),
    read `prefetch` batches ahead on a thread (integrations/engines/prefetch.py). Under DDP each rank reads its
    DistributedSampler shard (Lightning's own choice for testing, made here because Lightning only installs it
    into a bare DataLoader); its padding is dropped when the metrics gather results. Pass `dataset` to reuse one
    already built."""

    def __init__(self, mm_cfg, prefetch: int = 0, dataset=None):
        super().__init__()
        self.mm_cfg = mm_cfg
        self.prefetch = prefetch
        self.dataset = dataset

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            from mmengine.registry import DATASETS, DefaultScope

            with DefaultScope.overwrite_default_scope(self.mm_cfg.get('default_scope', 'mmyolo')):
                self.dataset = DATASETS.build(self.mm_cfg.test_dataloader.dataset)

    def test_dataloader(self) -> PrefetchLoader:
        from mmengine.dataset import pseudo_collate
        from torch.utils.data import DistributedSampler

        loader = self.mm_cfg.test_dataloader
        trainer = self.trainer
        sampler = DistributedSampler(self.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=False) if trainer is not None and trainer.world_size > 1 else None
        return PrefetchLoader(DataLoader(self.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                                         shuffle=False, sampler=sampler, collate_fn=pseudo_collate), self.prefetch)
