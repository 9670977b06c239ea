"""LightningDataModule over the aidkd datasets (KITTI, COCO, YOLO or the generated driving set)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from aidkd.data import (
    DetectionDataset,
    collate_fn,
    find_coco_split,
    generate_synth,
    load_coco_records,
    load_kitti_records,
    load_yolo_records,
    read_data_yaml,
    resize_samples,
)
from aidkd.data.kitti import KITTI_DEFAULT_CLASSES, KITTI_DEFAULT_IGNORE
from aidkd.engine.config import DataConfig

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


def check_format_matches_root(cfg: DataConfig) -> None:
    """A ``data.root`` that looks like another format than ``data.format`` is an error naming the one to set."""
    from aidkd.data.layout import format_mismatch
    from aidkd.data.structures import DatasetError

    if cfg.root:
        msg = format_mismatch(cfg.root, cfg.format)
        if msg:
            raise DatasetError(msg, file=cfg.root)


def ensure_synth(cfg: DataConfig) -> Path:
    """Generate the scenes unless ``synth_root`` already holds them; never writes into a folder aidkd did not
    generate (``generate_synth`` refuses it)."""
    check_format_matches_root(cfg)
    root = synth_root(cfg)
    done = root / ".complete"
    s = cfg.synth
    if done.exists() and synth_params(root) not in (None, _wanted_params(cfg)):
        log.info("data.synth differs from the scenes in %s: regenerating them", root)
        done.unlink()
    if not done.exists():
        log.info("generating %d synthetic driving scenes in %s", s.num_images, root)
        generate_synth(root, num_images=s.num_images, seed=s.seed, width=s.width, height=s.height,
                       hard_fraction=s.hard_fraction, mislabel_fraction=s.mislabel_fraction, classes=s.classes,
                       min_t=s.min_t, max_objects=s.max_objects, clutter=s.clutter)
        done.write_text("ok\n")
    return root


def _wanted_params(cfg: DataConfig) -> dict:
    s = cfg.synth
    return {"seed": s.seed, "num_images": s.num_images, "width": s.width, "height": s.height,
            "hard_fraction": s.hard_fraction, "mislabel_fraction": s.mislabel_fraction}


def synth_params(root: Path) -> dict | None:
    """The generator parameters recorded in ``root``'s marker (None without a readable marker)."""
    import json

    from aidkd.data.layout import SYNTH_MARKER

    try:
        data = json.loads((root / SYNTH_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: data.get(k) for k in _wanted_params(DataConfig())} if isinstance(data, dict) else None


def resolve_coco_files(cfg: DataConfig) -> None:
    """Fill ``data.{split}_ann`` / ``data.{split}_images`` from a COCO ``data.root`` (``find_coco_split``) where the
    json is not set; a split without a json and without a root is an error naming the keys to set."""
    if cfg.format != "coco":
        return
    for split in ("train", "val"):
        if getattr(cfg, f"{split}_ann"):
            continue
        if not cfg.root:
            raise ValueError(f"data.{split}_ann and data.{split}_images are required for COCO data, or data.root: a "
                             f"COCO root with annotations/instances_{split}*.json and its image folder")
        check_format_matches_root(cfg)
        ann, images = find_coco_split(cfg.root, split)
        setattr(cfg, f"{split}_ann", str(ann))
        if not getattr(cfg, f"{split}_images"):
            setattr(cfg, f"{split}_images", str(images))


def resolve_classes(cfg: DataConfig) -> tuple[list[str], list[str]]:
    if cfg.format == "coco":
        resolve_coco_files(cfg)
        if cfg.classes is None:
            _, names = load_coco_records(cfg.train_ann or cfg.val_ann, cfg.train_images or cfg.val_images, None)
            return names, []
        return list(cfg.classes), []
    if cfg.format == "yolo":
        check_format_matches_root(cfg)
        classes = list(cfg.classes) if cfg.classes is not None else read_data_yaml(_yolo_root(cfg)).names
        return classes, list(cfg.ignore_classes or [])
    return list(cfg.classes or KITTI_DEFAULT_CLASSES), list(cfg.ignore_classes if cfg.ignore_classes is not None
                                                   else KITTI_DEFAULT_IGNORE)


def _yolo_root(cfg: DataConfig) -> str:
    if not cfg.root:
        raise ValueError("data.root is required for YOLO data: the dataset's data.yaml or the folder holding it")
    return cfg.root


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
        check_format_matches_root(cfg)
        resolve_coco_files(cfg)
        ann = cfg.train_ann if split == "train" else cfg.val_ann
        images = cfg.train_images if split == "train" else cfg.val_images
        if not ann or not images:
            raise ValueError(f"data.{split}_ann and data.{split}_images are required for COCO data")
        records, _ = load_coco_records(ann, images, classes, errors=errors)
        return records
    if cfg.format == "yolo":
        check_format_matches_root(cfg)
        split_name = cfg.train_split if split == "train" else cfg.val_split
        records, _ = load_yolo_records(_yolo_root(cfg), split_name, classes, errors=errors,
                                       ignore_classes=cfg.ignore_classes)
        return records
    if cfg.format == "kitti" and not cfg.root:
        raise ValueError("data.root is required for KITTI data")
    check_format_matches_root(cfg)
    root = ensure_synth(cfg) if cfg.format == "synth" else Path(cfg.root or "")
    split_name = cfg.train_split if split == "train" else cfg.val_split
    split_file = cfg.train_split_file if split == "train" else cfg.val_split_file
    return load_kitti_records(root, split=split_name, split_file=split_file, val_fraction=cfg.val_fraction,
                              seed=cfg.split_seed, errors=errors)


def check_configured_data(cfg: DataConfig, run_dir: Path | None = None) -> str | None:
    """The full check of ``aidkd data check`` on the configured data (every label line, split file and image,
    fully decoded): every problem is raised in one :class:`DatasetError` (all listed, the same messages as
    ``data check``; its headline names the dataset). ``data.skip_invalid`` or ``data.check: off`` skips this (bad
    images are then left out and counted). ``data.check: full`` decodes every image unless the stamp of
    ``run_dir`` or of a run folder beside it shows the data unchanged since a passed full check (then, like
    ``header``, only headers are read); returns the stamp to record (``write_data_stamp``) after a passed full
    check, else None. Images are checked in a process pool."""
    from aidkd.data import check_dataset, combine_errors, sort_errors

    if cfg.skip_invalid or cfg.check == "off":
        return None
    if cfg.format == "coco":
        resolve_coco_files(cfg)
        sources = [(ann, images) for ann, images in ((cfg.train_ann, cfg.train_images), (cfg.val_ann, cfg.val_images))
                   if ann]
        sources = list(dict.fromkeys(sources))  # train and val may share a json
        fmt = "coco"
    elif cfg.format == "yolo":
        sources, fmt = [(_yolo_root(cfg), None)], "yolo"
    else:
        if cfg.format == "kitti" and not cfg.root:
            raise ValueError("data.root is required for KITTI data")
        sources = [(ensure_synth(cfg) if cfg.format == "synth" else Path(cfg.root), None)]
        fmt = "kitti"
    stamp = data_stamp(sources) if run_dir is not None and cfg.check == "full" else None
    passed = _passed_check(Path(run_dir), stamp) if stamp is not None else None
    decode = cfg.check == "full" and passed is None
    if passed is not None:
        log.info("data unchanged since the full check recorded in %s: reading image headers only", passed)
    workers = min(8, os.cpu_count() or 1)
    for path, images in sources:
        problems = sort_errors(check_dataset(path, fmt=fmt, image_dir=images, decode=decode, workers=workers))
        if problems:
            raise combine_errors(problems, what=f"{path} (found by the same check as `aidkd data check`)",
                                 limit=None, file=path)
    # a check passed in another run folder is recorded in this one too
    return stamp if decode or (passed is not None and passed.parent != Path(run_dir)) else None


def _passed_check(run_dir: Path, stamp: str) -> Path | None:
    """The stamp file recording a passed full check of exactly the files of ``stamp``: this run folder's, else one
    of the run folders beside it (another run on the same data: read, never written), else None."""
    own = run_dir / DATA_CHECK_STAMP
    if _read_stamp(own) == stamp:
        return own
    siblings = run_dir.parent.glob(f"*/{DATA_CHECK_STAMP}") if run_dir.parent.is_dir() else ()
    return next((f for f in sorted(siblings)[:MAX_STAMPS_READ] if f != own and _read_stamp(f) == stamp), None)


MAX_STAMPS_READ = 1000  # run folders beside a new run whose stamps are read (bounded: a folder of many runs)


def write_data_stamp(run_dir: Path, stamp: str | None) -> None:
    """Record a passed full check (``check_configured_data``'s return) in the run folder."""
    if stamp is not None:
        (Path(run_dir) / DATA_CHECK_STAMP).write_text(json.dumps({"files": stamp}) + "\n")


DATA_CHECK_STAMP = "data_check.json"


def data_stamp(sources) -> str:
    """A digest of every file of the configured data (path, size, mtime): equal digests mean unchanged data."""
    digest = hashlib.sha256()
    for path, images in sources:
        for root in (Path(path), Path(images) if images else None):
            if root is None or not root.exists():
                continue
            files = sorted(root.rglob("*")) if root.is_dir() else [root]
            for f in files:
                st = f.stat()
                if f.is_file():
                    digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_stamp(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None


def default_num_workers(on_gpu: bool) -> int:
    """Loader processes per training process when ``data.num_workers`` is unset: min(4, CPU cores per process) for
    GPU training (one process per GPU), 0 on the CPU, where the model needs the cores."""
    if not on_gpu:
        return 0
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, max(1, cores // max(1, torch.cuda.device_count())))


class DetectionDataModule(L.LightningDataModule):
    """``on_gpu``: training runs on a GPU: loaders pin their batches' memory (asynchronous copies to the device)
    and ``data.num_workers`` defaults to :func:`default_num_workers`."""

    def __init__(self, cfg: DataConfig, on_gpu: bool = False):
        super().__init__()
        self.cfg = cfg
        self.on_gpu = on_gpu
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(on_gpu)
        self.classes, self.ignore_classes = resolve_classes(cfg)
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None

    def make_dataset(self, split: str, train: bool, resize: bool | None = None) -> DetectionDataset:
        """``resize`` None: training datasets hand over uint8 images at their original size, which the training
        step makes float and resizes on the device (``aidkd.data.resize_samples``); evaluation datasets hand the
        model original float images, which its own transform resizes exactly as ``predict`` and the exported ONNX
        graph do. ``resize=True``: float images resized on the CPU (the tensors training sees, e.g. to draw them);
        ``False``: original float images."""
        c = self.cfg
        return DetectionDataset(load_records(c, split, self.classes), self.classes, self.ignore_classes,
                                min_size=c.min_size, max_size=c.max_size, train=train,
                                hflip_prob=c.hflip if train else 0.0, skip_invalid=c.skip_invalid,
                                resize=bool(resize), uint8=train and resize is None)

    def prepare_data(self) -> None:
        if self.cfg.format == "synth":
            ensure_synth(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.make_dataset("train", train=True)
        if self.val_set is None:
            self.val_set = self.make_dataset("val", train=False)

    def _loader(self, ds, batch_size: int, shuffle: bool, persistent: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate_fn, persistent_workers=persistent and self.num_workers > 0,
                          pin_memory=self.on_gpu)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Training targets are checked here, in host memory (boxes in the original image's pixels): on the device
        # the check would stall every step.
        if self.trainer is not None and self.trainer.training:
            from aidkd.models.targets import check_targets

            check_targets(batch[1])
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # On the device, before the training step and the callbacks see the batch: they all see what the model
        # trains on (uint8 originals -> float, resized; DetectionTask.prepare_batch does the same for direct calls).
        if self.trainer is not None and self.trainer.training:
            return resize_samples(*batch, self.cfg.min_size, self.cfg.max_size)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.cfg.batch_size, shuffle=True, persistent=True)

    def val_dataloader(self) -> DataLoader:
        # not persistent: validation runs once an epoch, its workers need not hold memory between
        return self._loader(self.val_set, self.cfg.val_batch_size or self.cfg.batch_size, shuffle=False,
                            persistent=False)


SPLIT_FOLDER = "split"  # RUN_DIR/split/{train,val}.txt


def write_split_files(run_dir: str | Path, train_records, val_records) -> list[Path]:
    """Write the images of each split a run uses, one a line (KITTI stem, or COCO image id), to
    ``RUN_DIR/split/train.txt`` and ``RUN_DIR/split/val.txt``; returns the paths written. ``aidkd eval-kitti --split
    RUN_DIR`` reads the val list, so predict -> eval-kitti scores exactly the run's validation images."""
    folder = Path(run_dir) / SPLIT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records in (("train", train_records), ("val", val_records)):
        path = folder / f"{name}.txt"
        path.write_text("".join(f"{r.stem or r.image_id}\n" for r in records), encoding="utf-8")
        written.append(path)
    return written


def run_split_file(run_dir: str | Path, split: str = "val") -> Path:
    """``RUN_DIR/split/{split}.txt`` (written by :func:`write_split_files`); an error naming it when missing."""
    path = Path(run_dir) / SPLIT_FOLDER / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is a folder without {SPLIT_FOLDER}/{split}.txt (the list of {split} images "
                                "a run writes); pass a run folder or a split file (one stem a line)")
    return path
