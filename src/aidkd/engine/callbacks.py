"""Callbacks that watch a run: model export, last / interrupt checkpoints, instance-weight and attention images."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from aidkd.eval.evaluator import PRIMARY_METRIC, strict_json
from aidkd.models import save_model_file

log = logging.getLogger("aidkd.engine")

INTERRUPTED_NAME = "interrupted.ckpt"  # what InterruptCheckpoint writes into checkpoints/


class ExportModel(L.Callback):
    """After each validation: write ``model_last.pt`` and, when the monitored metric improves, ``model_best.pt``.

    These hold the student detector alone (no teacher, no distillation modules) and load with ``aidkd eval``.
    """

    def __init__(self, out_dir: str | Path, monitor: str = PRIMARY_METRIC):
        self.out_dir = Path(out_dir)
        self.monitor = monitor
        self.best = -float("inf")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not pl_module.last_metrics:
            return
        metrics = dict(pl_module.last_metrics, epoch=trainer.current_epoch, step=trainer.global_step)
        finite = finite_state(pl_module, "model_last.pt / model_best.pt")
        if finite:
            save_model_file(self.out_dir / "model_last.pt", pl_module.model, pl_module.meta, metrics)
        value = metrics.get(self.monitor, -float("inf"))
        if finite and value > self.best:
            self.best = value
            save_model_file(self.out_dir / "model_best.pt", pl_module.model, pl_module.meta, metrics)
            (self.out_dir / "best_metrics.json").write_text(strict_json(metrics, indent=2))
        with open(self.history, "a") as f:  # one write, synced: a kill leaves whole lines
            f.write(strict_json(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @property
    def history(self) -> Path:
        return self.out_dir / "metrics_history.jsonl"

    def on_train_start(self, trainer, pl_module) -> None:
        # A kill between a validation's history line and the checkpoint after it: the resumed run redoes that
        # epoch, so drop the lines from after the checkpoint (and a torn last line) before they are written again.
        if not trainer.ckpt_path or not trainer.is_global_zero or not self.history.is_file():
            return
        kept, dropped = [], 0
        for line in self.history.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(entry.get("step", -1)) <= trainer.global_step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.history.with_name(self.history.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.history)
            log.info("%s: dropped %d line(s) from after the resumed checkpoint (step %d)", self.history, dropped,
                     trainer.global_step)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", self.best)


def finite_state(pl_module, what: str) -> bool:
    """Whether the model may be saved now (no non-finite loss in the last ``train.max_bad_steps`` steps, finite
    weights: ``is_finite_state``); says so in the log when not."""
    check = getattr(pl_module, "is_finite_state", None)
    if check is None or check():
        return True
    log.warning("step %d: not writing %s (non-finite losses in the last steps, or non-finite weights)",
                pl_module.global_step, what)
    return False


class FiniteBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (``best.ckpt``) that never saves a diverged state: the rule of ``last.ckpt``."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or finite_state(pl_module, Path(self.dirpath or ".") / f"{self.filename}.ckpt"):
            super().on_validation_end(trainer, pl_module)


class LastCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt`` at the end of every training epoch (after its validation, if any) and at the end of
    training, for resuming a killed run.

    Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes last.ckpt when a top-k checkpoint is written, i.e.
    when the monitored metric improves: a run killed after a non-improving validation would resume from its best
    epoch, not its latest. Saving at epoch end (not at validation end) stores the loops' state of a finished epoch, so
    a resumed run replays exactly what an uninterrupted one would. Being a ``Checkpoint``, this runs after the other
    checkpoint callbacks, so their state (the best score so far) is in the file.
    """

    def __init__(self, ckpt_dir: str | Path):
        self.path = Path(ckpt_dir) / "last.ckpt"
        self._resumed_interrupt: Path | None = None
        self._saved_step = -1
        self.saved_step: int | str = "unknown"  # of the last.ckpt on disk

    def good_checkpoint(self) -> Path | None:
        """last.ckpt, which only ever holds a state from finite steps (None when there is none yet)."""
        return self.path if self.path.is_file() else None

    def _save(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self._saved_step == trainer.global_step:
            return
        self._saved_step = trainer.global_step  # (also when skipped: decided once per step)
        finite = getattr(pl_module, "is_finite_state", None)
        if finite is not None and not finite():
            # keep the previous (good) last.ckpt: this state had non-finite losses lately or has non-finite weights
            kept = f"it keeps step {self.saved_step}" if self.path.is_file() else "there is none yet"
            log.warning("step %d: not writing %s (non-finite losses in the last steps, or non-finite weights); %s",
                        trainer.global_step, self.path, kept)
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # with optimizer and loop state, to resume from
        self.saved_step = trainer.global_step
        if self._resumed_interrupt is not None and trainer.is_global_zero and self._resumed_interrupt.is_file():
            # the run resumed from interrupted.ckpt and last.ckpt now holds a later state: the older file only
            # costs disk (a model with its optimizer state)
            self._resumed_interrupt.unlink()
            log.info("removed %s: %s holds a later step (%d)", self._resumed_interrupt, self.path, trainer.global_step)
            self._resumed_interrupt = None

    def on_train_start(self, trainer, pl_module) -> None:
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        if resumed == self.path.resolve():
            self.saved_step = trainer.global_step  # resumed from it
        interrupted = self.path.with_name(INTERRUPTED_NAME)
        self._resumed_interrupt = interrupted if resumed == interrupted.resolve() else None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # train.max_steps can stop a run mid-epoch
        self._save(trainer, pl_module)


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C (SIGINT) or SIGTERM save ``checkpoints/interrupted.ckpt`` before Lightning shuts the run down.

    Lightning turns a SIGTERM into ``SIGTERMException`` at the next safe point: after the current batch, or after
    the epoch's bookkeeping at its end (on every rank). A Ctrl-C takes the same way (``stop_at_step_end``), so the
    checkpoint holds a finished step or epoch and a resumed run continues exactly as an uninterrupted one. A second
    Ctrl-C stops at once, without interrupted.ckpt (its state would be mid-step); last.ckpt stays.
    """

    def __init__(self, ckpt_dir: str | Path, resume_hint: str | None = None):
        self.ckpt_dir = Path(ckpt_dir)
        self.resume_hint = resume_hint
        self.signal: int | None = None  # the signal that stopped the run

    @contextlib.contextmanager
    def stop_at_step_end(self, trainer: L.Trainer):
        """Within: the first Ctrl-C asks Lightning to stop as a SIGTERM does; a second one raises KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return

        def on_sigint(signum, frame) -> None:
            if self.signal == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signal.SIGINT
            trainer._signal_connector.received_sigterm = True  # Lightning's own flag: its safe points raise
            log.warning("Ctrl-C: stopping after the current step, saving %s (Ctrl-C again: stop at once, "
                        "without it)", self.ckpt_dir / "interrupted.ckpt")

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            log.warning("stopped at once at step %d: no interrupted.ckpt (resume from checkpoints/last.ckpt)",
                        trainer.global_step)
        elif isinstance(exception, SIGTERMException):
            self.signal = self.signal or signal.SIGTERM
            path = self.ckpt_dir / INTERRUPTED_NAME
            trainer.save_checkpoint(path, weights_only=False)
            why = "interrupted (Ctrl-C)" if self.signal == signal.SIGINT else "terminated (SIGTERM)"
            log.warning("%s at step %d: checkpoint saved to %s (%s)", why, trainer.global_step, path,
                        self.resume_hint or f"resume with --resume {path}")


class TrainTime(L.Callback):
    """Wall-clock seconds of training, summed over the segments of a resumed run (the sum travels in the
    checkpoints), written to ``RUN_DIR/train_time.json`` (``{"seconds", "segments"}``) when training ends."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "train_time.json"
        self.seconds = 0.0  # of the earlier segments
        self.segments = 0
        self._start: float | None = None

    def elapsed(self) -> float:
        return self.seconds + (time.monotonic() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        self.segments += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds, self._start = self.elapsed(), None
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"seconds": round(self.seconds, 3), "segments": self.segments}) + "\n")

    def state_dict(self) -> dict:
        return {"seconds": self.elapsed(), "segments": self.segments}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state.get("seconds", 0.0))
        self.segments = int(state.get("segments", 0))


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class EpochProgress(L.Callback):
    """One plain line per training epoch on stdout (run name, epoch, mean training loss, elapsed, ETA): the progress
    of a run whose output is a log file or pipe, where a progress bar shows nothing until it ends."""

    def __init__(self, name: str = ""):
        self.name = name
        self._start = 0.0
        self._first_epoch = self._first_step = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        self._first_epoch, self._first_step = trainer.current_epoch, trainer.global_step

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._batches = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_sum = self._loss_sum + loss.detach()  # summed on the device: no sync every step
            self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        elapsed = time.monotonic() - self._start
        epoch = trainer.current_epoch + 1
        eta = elapsed / max(epoch - self._first_epoch, 1) * max(trainer.max_epochs - epoch, 0)
        if trainer.max_steps and trainer.max_steps > 0 and trainer.global_step > self._first_step:
            per_step = elapsed / (trainer.global_step - self._first_step)
            eta = min(eta, per_step * max(trainer.max_steps - trainer.global_step, 0))
        loss = float(self._loss_sum) / self._batches if self._batches else float("nan")
        prefix = f"{self.name}: " if self.name else ""
        print(f"{prefix}epoch {epoch}/{trainer.max_epochs}  loss {loss:.4f}  elapsed {format_duration(elapsed)}  "
              f"ETA {format_duration(eta)}", file=sys.stderr, flush=True)



class DistillImages(L.Callback):
    """Every ``every`` steps, log to TensorBoard the AID instance weights over the input and the attention masks."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        d = pl_module.distiller
        if (d is None or self.every <= 0 or trainer.global_step % self.every or d.last_inputs is None
                or not trainer.is_global_zero):
            return
        writer = _tensorboard(trainer)
        if writer is None:
            return
        images, targets = batch
        inputs = d.last_inputs
        image = images[0].detach().cpu()
        writer.add_image("distill/instance_weights",
                         weight_overlay(image, targets[0]["boxes"].cpu(), inputs.pixel_weights), trainer.global_step)
        from aidkd.distill.attention import attention_masks

        spatial, _ = attention_masks(inputs.teacher[0][:1].float(), 0.5)
        writer.add_image("distill/teacher_spatial_attention", _heat(spatial[0]), trainer.global_step)


def _tensorboard(trainer):
    for lg in trainer.loggers:
        if isinstance(lg, L.pytorch.loggers.TensorBoardLogger):
            return lg.experiment
    return None


def _heat(m: torch.Tensor) -> torch.Tensor:
    m = m.detach().float().cpu()
    m = (m - m.min()) / (m.max() - m.min() + 1e-12)
    return m.unsqueeze(0)


def weight_overlay(image: torch.Tensor, boxes: torch.Tensor, pixel_weights) -> torch.Tensor:
    """The input image with the finest level's per-pixel AID weight blended in red (low weight = red)."""
    img = image.clone().float()
    if pixel_weights is not None:
        pw = pixel_weights[0][0].detach().float().cpu()[None, None]
        pw = torch.nn.functional.interpolate(pw, size=img.shape[-2:], mode="nearest")[0, 0]
        img[0] = torch.clamp(img[0] + (1 - pw) * 0.8, 0, 1)
        img[1:] = img[1:] * pw.clamp(0.2, 1)
    for b in boxes.round().long().tolist():
        x1, y1, x2, y2 = [int(np.clip(v, 0, s - 1)) for v, s in zip(b, [img.shape[2], img.shape[1]] * 2)]
        img[:, y1, x1:x2 + 1] = torch.tensor([1.0, 1.0, 0.0])[:, None]
        img[:, y2, x1:x2 + 1] = torch.tensor([1.0, 1.0, 0.0])[:, None]
        img[:, y1:y2 + 1, x1] = torch.tensor([1.0, 1.0, 0.0])[:, None]
        img[:, y1:y2 + 1, x2] = torch.tensor([1.0, 1.0, 0.0])[:, None]
    return img
