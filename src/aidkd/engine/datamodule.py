"""LightningDataModule over the aidkd datasets (KITTI, COCO or the generated driving set)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from aidkd.data import DetectionDataset, collate_fn, generate_synth, load_coco_records, load_kitti_records
from aidkd.engine.config import KITTI_CLASSES, KITTI_IGNORE, DataConfig

log = logging.getLogger("aidkd.data")


def synth_root(cfg: DataConfig) -> Path:
    """Where the generated set lives: ``data.root`` or a cache folder keyed by its parameters."""
    s = cfg.synth
    if cfg.root:
        return Path(cfg.root)
    key = f"n{s.num_images}_s{s.seed}_{s.width}x{s.height}_h{s.hard_fraction}_m{s.mislabel_fraction}"
    if (s.classes, s.min_t, s.max_objects, s.clutter) != (None, 0.0, 10, 5):  # the easier-set options, when set
        key += f"_c{'-'.join(s.classes or ['all'])}_t{s.min_t}_o{s.max_objects}_k{s.clutter}"
    return Path("runs") / "synth_cache" / key


def ensure_synth(cfg: DataConfig) -> Path:
    root = synth_root(cfg)
    done = root / ".complete"
    if not done.exists():
        s = cfg.synth
        log.info("generating %d synthetic driving scenes in %s", s.num_images, root)
        generate_synth(root, num_images=s.num_images, seed=s.seed, width=s.width, height=s.height,
                       hard_fraction=s.hard_fraction, mislabel_fraction=s.mislabel_fraction, classes=s.classes,
                       min_t=s.min_t, max_objects=s.max_objects, clutter=s.clutter)
        done.write_text("ok\n")
    return root


def resolve_classes(cfg: DataConfig) -> tuple[list[str], list[str]]:
    if cfg.format == "coco":
        if cfg.classes is None:
            _, names = load_coco_records(cfg.train_ann or cfg.val_ann, cfg.train_images or cfg.val_images, None)
            return names, []
        return list(cfg.classes), []
    return list(cfg.classes or KITTI_CLASSES), list(cfg.ignore_classes if cfg.ignore_classes is not None
                                                   else KITTI_IGNORE)


def load_records(cfg: DataConfig, split: str, classes: list[str]):
    """ImageRecords of one split ('train' or 'val').

    Invalid labels stop the run with every problem listed, unless ``data.skip_invalid``: then the affected images
    are left out and counted in the log.
    """
    errors: list | None = [] if cfg.skip_invalid else None
    records = _load_split(cfg, split, classes, errors)
    if errors:
        log.warning("%s split: skipped %d invalid label(s)/image(s) (data.skip_invalid); first: %s", split,
                    len(errors), errors[0])
    return records


def _load_split(cfg: DataConfig, split: str, classes: list[str], errors: list | None):
    if cfg.format == "coco":
        ann = cfg.train_ann if split == "train" else cfg.val_ann
        images = cfg.train_images if split == "train" else cfg.val_images
        if not ann or not images:
            raise ValueError(f"data.{split}_ann and data.{split}_images are required for COCO data")
        records, _ = load_coco_records(ann, images, classes, errors=errors)
        return records
    root = ensure_synth(cfg) if cfg.format == "synth" else Path(cfg.root or "")
    if cfg.format == "kitti" and not cfg.root:
        raise ValueError("data.root is required for KITTI data")
    split_name = cfg.train_split if split == "train" else cfg.val_split
    split_file = cfg.train_split_file if split == "train" else cfg.val_split_file
    return load_kitti_records(root, split=split_name, split_file=split_file, val_fraction=cfg.val_fraction,
                              seed=cfg.split_seed, errors=errors)


class DetectionDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.classes, self.ignore_classes = resolve_classes(cfg)
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None

    def make_dataset(self, split: str, train: bool) -> DetectionDataset:
        c = self.cfg
        return DetectionDataset(load_records(c, split, self.classes), self.classes, self.ignore_classes,
                                min_size=c.min_size, max_size=c.max_size, train=train,
                                hflip_prob=c.hflip if train else 0.0, skip_invalid=c.skip_invalid)

    def prepare_data(self) -> None:
        if self.cfg.format == "synth":
            ensure_synth(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.make_dataset("train", train=True)
        if self.val_set is None:
            self.val_set = self.make_dataset("val", train=False)

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.cfg.num_workers,
                          collate_fn=collate_fn, persistent_workers=self.cfg.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.cfg.val_batch_size or self.cfg.batch_size, shuffle=False)
