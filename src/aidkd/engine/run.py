"""Python API behind the CLI: ``train`` (plain or distilled), ``evaluate`` and ``predict``."""
from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from aidkd.engine.callbacks import (
    DistillImages,
    EpochProgress,
    ExportModel,
    FiniteBestCheckpoint,
    InterruptCheckpoint,
    LastCheckpoint,
    TrainTime,
    finite_state,
)
from aidkd.engine.checkpoint_io import SafeCheckpointIO
from aidkd.engine.config import RunConfig, check_ranges, dump_config
from aidkd.engine.datamodule import (
    DetectionDataModule,
    check_configured_data,
    write_data_stamp,
    write_split_files,
)
from aidkd.engine.module import VAL_PREFIX, DetectionTask, renamed_state
from aidkd.engine.run_folder import (
    RunFolderLock,
    check_run_folder,
    clear_previous_run,
    is_rank_zero_process,
    remove_partial_files,
    resolve_resume,
    start_run_record,
)
from aidkd.eval.evaluator import PRIMARY_METRIC, read_metrics, strict_json
from aidkd.models import load_detector
from aidkd.models.weights import CheckpointError, load_checkpoint

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


def build_trainer(cfg: RunConfig, out_dir: Path, extra_callbacks=(), resume_hint: str | None = None) -> L.Trainer:
    t = cfg.train
    ckpt_dir = out_dir / "checkpoints"
    # Lightning's bar in a terminal; one plain line per epoch into a log file or pipe (or with progress_bar off)
    bar = t.progress_bar and sys.stdout.isatty()
    callbacks = [
        # only after a validation (saving at a train epoch end without one warns that val/coco/AP is missing)
        FiniteBestCheckpoint(dirpath=ckpt_dir, filename="best", monitor=VAL_PREFIX + PRIMARY_METRIC, mode="max",
                             save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=False),
        LastCheckpoint(ckpt_dir),
        ExportModel(out_dir),
        InterruptCheckpoint(ckpt_dir, resume_hint),
        TrainTime(out_dir),
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
    if cfg.distill is not None:
        callbacks.append(DistillImages(cfg.distill.image_log_every))
    callbacks.append(RichProgressBar(leave=True) if bar else EpochProgress(cfg.name))
    # A resumed run appends to TensorBoard and starts a new CSV version, so no earlier log is overwritten.
    loggers = [TensorBoardLogger(out_dir, name="tb", version=""), CSVLogger(out_dir, name="csv")]
    return L.Trainer(
        default_root_dir=out_dir, max_epochs=t.epochs, max_steps=t.max_steps, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=_precision(cfg),
        gradient_clip_val=t.grad_clip, deterministic=t.deterministic, check_val_every_n_epoch=t.val_every,
        benchmark=t.cudnn_benchmark and not t.deterministic,
        log_every_n_steps=t.log_every, callbacks=callbacks, logger=loggers, num_sanity_val_steps=0,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        enable_progress_bar=bar, plugins=[SafeCheckpointIO()], enable_model_summary=False,
    )


def train(cfg: RunConfig, resume: str | Path | bool | None = None, extra_callbacks=(), overwrite: bool = False,
          resume_missing_ok: bool = False, resume_hint: str | None = None) -> dict:
    """Train (or distil, when ``cfg.distill`` is set) and return the final validation metrics.

    ``resume``: a run folder, a checkpoint, or True for ``cfg.output_dir`` (nothing to resume is an error unless
    ``resume_missing_ok``). A new run needs an empty ``output_dir`` unless ``overwrite``. ``resume_hint``: how to
    resume, for the message of an interrupted run (default: ``--resume <checkpoint>``). Nothing is written before
    the data, model and teacher checks pass; the run holds an exclusive lock on its folder (run_folder.py).
    """
    check_ranges(cfg)  # (a config from load_config is checked already; this one may have been edited since)
    out_dir, ckpt = resolve_resume(cfg.output_dir, resume, missing_ok=resume_missing_ok)
    cfg.output_dir = str(out_dir)
    # the checkpoint to resume, read once for both checks below (Lightning reads it again to restore it)
    resumed_state = load_checkpoint(ckpt) if ckpt is not None else None
    finished = _finished_run_metrics(ckpt, resumed_state, cfg) if ckpt is not None else None
    if finished is not None:
        return finished
    owner = is_rank_zero_process()  # a distributed run's other processes re-run this: rank 0 owns the folder
    if owner:  # --resume-or-new that found no checkpoint may start anew over a run killed before its first one
        check_run_folder(out_dir, resuming=ckpt is not None, overwrite=overwrite, restart=resume_missing_ok)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dm = DetectionDataModule(cfg.data, on_gpu=uses_gpu(cfg))
    dm.prepare_data()
    # every problem `aidkd data check` would list, before any training; once, by the first process
    data_stamp = check_configured_data(cfg.data, run_dir=out_dir) if owner else None
    dm.setup("fit")
    if len(dm.train_set) == 0:  # (with data.skip_invalid, or a split the data check does not see)
        raise ValueError(f"data: the training split ({cfg.data.train_split_file or cfg.data.train_ann or cfg.data.root}) "
                         "holds no image: check the split files, or data.val_fraction")
    task = DetectionTask(cfg, dm.classes, val_records=dm.val_set.records, kitti_metrics=uses_kitti_metrics(cfg))
    if ckpt is not None:
        check_resume(cfg, task, ckpt, resumed_state)
        del resumed_state
    lock = RunFolderLock(out_dir)
    if owner:
        lock.acquire()
    try:
        if owner:
            remove_partial_files(out_dir)
            # again, under the lock
            stale = check_run_folder(out_dir, resuming=ckpt is not None, overwrite=overwrite,
                                     restart=resume_missing_ok)
            clear_previous_run(out_dir, stale, "--overwrite" if overwrite else "--resume-or-new")
            if ckpt is None:
                start_run_record(out_dir)
            dump_config(cfg, out_dir / "config.yaml")
            write_split_files(out_dir, dm.train_set.records, dm.val_set.records)
            write_data_stamp(out_dir, data_stamp)
        trainer = build_trainer(cfg, out_dir, extra_callbacks, resume_hint)
        interrupt = next(c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint))
        try:
            with interrupt.stop_at_step_end(trainer):
                trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        except SIGTERMException:
            # Lightning's SystemExit carries no code, so a terminated run would exit 0 as if it had finished: exit
            # 128 + the signal as a process the signal killed (InterruptCheckpoint saved interrupted.ckpt)
            raise SystemExit(128 + (interrupt.signal or signal.SIGTERM)) from None
        if not trainer.interrupted and task.validated_step != trainer.global_step:
            # train.max_steps stopped the run between validations: the final metrics must be of the final weights.
            trainer.validate(task, datamodule=dm, verbose=False)
        metrics = dict(task.last_metrics)
        _ensure_best_checkpoint(trainer, metrics)  # on every rank: saving holds a barrier
        if trainer.is_global_zero:
            (out_dir / "final_metrics.json").write_text(strict_json(metrics, indent=2))
    finally:
        lock.release()
    return metrics


def _finished_run_metrics(ckpt: Path, state: dict, cfg: RunConfig) -> dict | None:
    """The stored final metrics when ``ckpt`` (read: ``state``) ends a run that already trained as far as ``cfg``
    says (its ``train.epochs``, or ``train.max_steps``): resuming it is a no-op that writes nothing. None otherwise."""
    final = ckpt.parent.parent / "final_metrics.json"
    if not final.is_file():  # stopped before its final metrics: resuming finishes it
        return None
    epochs = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    step, t = int(state.get("global_step", -1)), cfg.train
    if not (epochs == t.epochs or 0 < t.max_steps <= step):
        return None
    try:
        metrics = read_metrics(final.read_text())
    except (OSError, ValueError):
        return None
    log.info("%s: the run already finished (epoch %s of train.epochs %d, step %d); nothing to resume, nothing "
             "written (raise train.epochs to train on)", ckpt, epochs, t.epochs, step)
    return metrics


# What a resumed run may change: the schedule's length (not below the epochs done) and step size (the advice after a non-finite stop), and
# what only names, places or logs the run. Anything else would make the resumed run another experiment.
RESUME_MAY_CHANGE = ("name", "output_dir", "train.epochs", "train.lr", "distill.loss_scale", "train.log_every",
                     "train.progress_bar", "distill.image_log_every", "data.num_workers")


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): d}


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys where two configs (``RunConfig.to_dict()``) differ, as ``key (old -> new)``."""
    a, b = _flat(old), _flat(new)
    return [f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def check_resume(cfg: RunConfig, task: DetectionTask, ckpt: Path, state: dict) -> None:
    """Refuse a resume that cannot continue the run in ``ckpt`` (read: ``state``), before anything is written:
    weights of another model, ``train.epochs`` below the epochs already done, or config changes beyond
    ``RESUME_MAY_CHANGE`` (the allowed ones are listed in the log)."""
    got = renamed_state(state.get("state_dict") or {})
    want = task.state_dict()
    problems = [f"size mismatch for {k}: checkpoint {list(got[k].shape)}, model {list(v.shape)}"
                for k, v in want.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    problems += [f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
    if problems:
        raise CheckpointError(f"--resume {ckpt}: its weights do not fit this config's model (another arch, backbone, "
                              f"fpn_channels or class list?): {'; '.join(problems[:3])}"
                              + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    done = int(state.get("epoch", 0)) + 1  # the epoch a checkpoint is saved in, counting from 1
    if cfg.train.epochs < done:
        raise ValueError(f"--resume {ckpt}: the run is at epoch {done}; train.epochs={cfg.train.epochs} would end "
                         f"it before that: set train.epochs >= {done} (--set train.epochs={done})")
    saved = state.get("aidkd_config")
    if not isinstance(saved, dict):
        return
    changed = config_differences(saved, cfg.to_dict())
    allowed = [c for c in changed if c.split(" ")[0] in RESUME_MAY_CHANGE]
    refused = [c for c in changed if c not in allowed]
    if refused:
        raise ValueError(f"--resume {ckpt}: the config differs from the run's in {', '.join(refused)}; a resumed run "
                         f"may change only {', '.join(RESUME_MAY_CHANGE)}: start a new run "
                         "(another output_dir, or --overwrite) to change the others")
    if allowed:
        log.info("resuming %s with changed %s", ckpt, ", ".join(allowed))


def _ensure_best_checkpoint(trainer: L.Trainer, metrics: dict) -> None:
    """Write checkpoints/best.ckpt after a run whose only validation came after training (a short train.max_steps
    run), or whose final validation beats the best one: the run folder always holds a best.ckpt."""
    mc = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if mc is None or PRIMARY_METRIC not in metrics or trainer.interrupted:
        return
    if not finite_state(trainer.lightning_module, Path(mc.dirpath) / f"{mc.filename}.ckpt"):
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
