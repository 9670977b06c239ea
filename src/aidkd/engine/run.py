"""Python API behind the CLI: ``train`` (plain or distilled), ``evaluate`` and ``predict``."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from aidkd.engine.callbacks import DistillImages, ExportModel, InterruptCheckpoint, LastCheckpoint
from aidkd.engine.checkpoint_io import SafeCheckpointIO
from aidkd.engine.config import RunConfig, dump_config
from aidkd.engine.datamodule import DetectionDataModule, check_configured_data
from aidkd.engine.model_io import load_detector
from aidkd.engine.module import DetectionTask

log = logging.getLogger("aidkd.engine")

# Lightning's advice on num_workers and small logging intervals is noise for CPU demo runs.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def _precision(cfg: RunConfig) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "16-mixed" if torch.cuda.is_available() and cfg.train.accelerator in ("auto", "gpu", "cuda") else "32-true"


def uses_kitti_metrics(cfg: RunConfig) -> bool:
    return cfg.eval.kitti if cfg.eval.kitti is not None else cfg.data.format in ("kitti", "synth")


def find_resume_checkpoint(out_dir: Path, resume: str | bool | None) -> str | None:
    """``--resume`` alone picks the newest of last.ckpt / interrupted.ckpt in the run folder."""
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("auto", "last"):
        if not Path(resume).exists():
            raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
        return resume
    candidates = [p for p in (out_dir / "checkpoints").glob("*.ckpt") if p.name in ("last.ckpt", "interrupted.ckpt")]
    if not candidates:
        log.warning("--resume: no checkpoint in %s; starting from scratch", out_dir / "checkpoints")
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def build_trainer(cfg: RunConfig, out_dir: Path, extra_callbacks=()) -> L.Trainer:
    t = cfg.train
    ckpt_dir = out_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/coco/AP", mode="max", save_top_k=1,
                        every_n_epochs=1),
        LastCheckpoint(ckpt_dir),
        ExportModel(out_dir),
        InterruptCheckpoint(ckpt_dir),
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
    if cfg.distill is not None:
        callbacks.append(DistillImages(cfg.distill.image_log_every))
    if t.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    # A resumed run appends to TensorBoard and starts a new CSV version, so no earlier log is overwritten.
    loggers = [TensorBoardLogger(out_dir, name="tb", version=""), CSVLogger(out_dir, name="csv")]
    return L.Trainer(
        default_root_dir=out_dir, max_epochs=t.epochs, max_steps=t.max_steps, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=_precision(cfg),
        gradient_clip_val=t.grad_clip, deterministic=t.deterministic, check_val_every_n_epoch=t.val_every,
        log_every_n_steps=t.log_every, callbacks=callbacks, logger=loggers, num_sanity_val_steps=0,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        enable_progress_bar=t.progress_bar, plugins=[SafeCheckpointIO()], enable_model_summary=False,
    )


def train(cfg: RunConfig, resume: str | bool | None = None, extra_callbacks=()) -> dict:
    """Train (or distil, when ``cfg.distill`` is set) and return the final validation metrics."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dm = DetectionDataModule(cfg.data)
    dm.prepare_data()
    check_configured_data(cfg.data)  # every problem `aidkd data check` would list, before any training
    dm.setup("fit")
    task = DetectionTask(cfg, dm.classes, val_records=dm.val_set.records, kitti_metrics=uses_kitti_metrics(cfg))
    trainer = build_trainer(cfg, out_dir, extra_callbacks)
    trainer.fit(task, datamodule=dm, ckpt_path=find_resume_checkpoint(out_dir, resume), weights_only=True)
    if not trainer.interrupted and task.validated_step != trainer.global_step:
        # train.max_steps stopped the run between validations: the final metrics must be of the final weights.
        trainer.validate(task, datamodule=dm, verbose=False)
    metrics = dict(task.last_metrics)
    if trainer.is_global_zero:
        (out_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def evaluate(cfg: RunConfig, checkpoint: str | Path, split: str = "val") -> dict:
    """Metrics of a trained detector on the configured split (the classes must match the checkpoint's)."""
    dm = DetectionDataModule(cfg.data)
    dm.prepare_data()
    ds = dm.make_dataset(split, train=False)
    model, _ = load_detector(checkpoint, classes=dm.classes)
    task = DetectionTask(cfg, dm.classes, val_records=ds.records, kitti_metrics=uses_kitti_metrics(cfg), model=model,
                        with_teacher=False)
    trainer = L.Trainer(accelerator=cfg.train.accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=cfg.train.limit_val_batches)
    dm.val_set = ds
    trainer.validate(task, dataloaders=dm.val_dataloader(), verbose=False)
    return dict(task.last_metrics)


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: list[torch.Tensor], score_thresh: float = 0.05) -> list[dict]:
    """Detections for a list of CHW [0,1] tensors, boxes in those tensors' pixels."""
    model.eval()
    out = model(images)
    return [{k: v[p["scores"] >= score_thresh] for k, v in p.items()} for p in out]
