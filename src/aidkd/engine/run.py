"""Python API behind the CLI: ``train`` (plain or distilled), ``evaluate`` and ``predict``."""
from __future__ import annotations

import json
import logging
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from aidkd.engine.callbacks import DistillImages, ExportModel, InterruptCheckpoint, LastCheckpoint
from aidkd.engine.checkpoint_io import SafeCheckpointIO
from aidkd.engine.config import RunConfig, dump_config
from aidkd.engine.datamodule import DetectionDataModule, check_configured_data, write_data_stamp
from aidkd.engine.module import VAL_PREFIX, DetectionTask
from aidkd.engine.run_folder import (
    RunFolderLock,
    check_run_folder,
    clear_previous_run,
    is_rank_zero_process,
    remove_partial_files,
    resolve_resume,
)
from aidkd.eval.evaluator import PRIMARY_METRIC
from aidkd.models import load_detector
from aidkd.models.weights import CheckpointError

log = logging.getLogger("aidkd.engine")

# Lightning's advice on num_workers and small logging intervals is noise for CPU demo runs.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
# run_folder.py decides which folders a run may use; a resumed run's checkpoints/ is never empty
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")


def uses_gpu(cfg: RunConfig) -> bool:
    """Whether the run trains on CUDA GPUs (``train.accelerator`` auto / gpu / cuda with one available)."""
    return torch.cuda.is_available() and cfg.train.accelerator in ("auto", "gpu", "cuda")


def _precision(cfg: RunConfig) -> str:
    """``train.precision``; ``auto``: bf16 autocast where the GPU has it (no loss scaling needed), fp16 with a
    gradient scaler on older GPUs, float32 on the CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if not uses_gpu(cfg):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def uses_kitti_metrics(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s runs compute KITTI AP|R40: ``eval.kitti`` when set, else on for KITTI and synth data."""
    return cfg.eval.kitti if cfg.eval.kitti is not None else cfg.data.format in ("kitti", "synth")


def build_trainer(cfg: RunConfig, out_dir: Path, extra_callbacks=()) -> L.Trainer:
    t = cfg.train
    ckpt_dir = out_dir / "checkpoints"
    callbacks = [
        # only after a validation (saving at a train epoch end without one warns that val/coco/AP is missing)
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=VAL_PREFIX + PRIMARY_METRIC, mode="max", save_top_k=1,
                        every_n_epochs=1, save_on_train_epoch_end=False),
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
        benchmark=t.cudnn_benchmark and not t.deterministic,
        log_every_n_steps=t.log_every, callbacks=callbacks, logger=loggers, num_sanity_val_steps=0,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        enable_progress_bar=t.progress_bar, plugins=[SafeCheckpointIO()], enable_model_summary=False,
    )


def train(cfg: RunConfig, resume: str | Path | bool | None = None, extra_callbacks=(), overwrite: bool = False,
          resume_missing_ok: bool = False) -> dict:
    """Train (or distil, when ``cfg.distill`` is set) and return the final validation metrics.

    ``resume``: a run folder, a checkpoint, or True for ``cfg.output_dir`` (nothing to resume is an error unless
    ``resume_missing_ok``). A new run needs an empty ``output_dir`` unless ``overwrite``. Nothing is written before
    the data, model and teacher checks pass; the run holds an exclusive lock on its folder (run_folder.py).
    """
    out_dir, ckpt = resolve_resume(cfg.output_dir, resume, missing_ok=resume_missing_ok)
    cfg.output_dir = str(out_dir)
    owner = is_rank_zero_process()  # a distributed run's other processes re-run this: rank 0 owns the folder
    if owner:
        check_run_folder(out_dir, resuming=ckpt is not None, overwrite=overwrite)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dm = DetectionDataModule(cfg.data, on_gpu=uses_gpu(cfg))
    dm.prepare_data()
    # every problem `aidkd data check` would list, before any training; once, by the first process
    data_stamp = check_configured_data(cfg.data, run_dir=out_dir) if owner else None
    dm.setup("fit")
    task = DetectionTask(cfg, dm.classes, val_records=dm.val_set.records, kitti_metrics=uses_kitti_metrics(cfg))
    lock = RunFolderLock(out_dir)
    if owner:
        lock.acquire()
    try:
        if owner:
            check_run_folder(out_dir, resuming=ckpt is not None, overwrite=overwrite)  # again, under the lock
            if overwrite and ckpt is None:
                clear_previous_run(out_dir)
            remove_partial_files(out_dir)
            dump_config(cfg, out_dir / "config.yaml")
            write_data_stamp(out_dir, data_stamp)
        trainer = build_trainer(cfg, out_dir, extra_callbacks)
        try:
            trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        except SIGTERMException:
            # Lightning's SystemExit carries no code, so a terminated run would exit 0 as if it had finished: exit
            # 128 + 15 as a process the signal killed (InterruptCheckpoint saved interrupted.ckpt)
            raise SystemExit(128 + signal.SIGTERM) from None
        except RuntimeError as e:
            if ckpt is None or "Error(s) in loading state_dict" not in str(e):
                raise
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
            raise CheckpointError(f"--resume {ckpt}: its weights do not fit this config's model (another arch, "
                                  f"backbone, fpn_channels or class list?): {detail}") from None
        if not trainer.interrupted and task.validated_step != trainer.global_step:
            # train.max_steps stopped the run between validations: the final metrics must be of the final weights.
            trainer.validate(task, datamodule=dm, verbose=False)
        metrics = dict(task.last_metrics)
        _ensure_best_checkpoint(trainer, metrics)  # on every rank: saving holds a barrier
        if trainer.is_global_zero:
            (out_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    finally:
        lock.release()
    return metrics


def _ensure_best_checkpoint(trainer: L.Trainer, metrics: dict) -> None:
    """Write checkpoints/best.ckpt after a run whose only validation came after training (a short train.max_steps
    run), or whose final validation beats the best one: the run folder always holds a best.ckpt."""
    mc = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if mc is None or PRIMARY_METRIC not in metrics or trainer.interrupted:
        return
    best = Path(mc.dirpath) / f"{mc.filename}.ckpt"
    score = mc.best_model_score  # the same on every rank, unlike a look at the file system
    if score is not None and float(score) >= metrics[PRIMARY_METRIC]:
        return
    trainer.save_checkpoint(best, weights_only=False)
    mc.best_model_path, mc.best_model_score = str(best), torch.tensor(float(metrics[PRIMARY_METRIC]))


def evaluate(cfg: RunConfig, checkpoint: str | Path, split: str = "val") -> dict:
    """Metrics of a trained detector on the configured split (the classes must match the checkpoint's)."""
    dm = DetectionDataModule(cfg.data, on_gpu=uses_gpu(cfg))
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
