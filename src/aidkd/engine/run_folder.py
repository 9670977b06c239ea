"""The run folder's rules: what ``--resume`` resumes, which folders a new run may use, and one run per folder.

- A new run needs an empty (or missing) ``output_dir``; ``overwrite=True`` first removes the previous run's outputs
  (only the files aidkd writes; anything else in the folder is left alone).
- ``resume`` is a run folder, a checkpoint file, or ``True`` / ``"auto"`` for the config's ``output_dir``; finding
  no checkpoint is an error unless ``missing_ok`` (then a new run starts, under the new-run rule).
- While a run trains, its process holds an exclusive ``flock`` on ``<output_dir>/.aidkd.lock``; a second run on the
  same folder is refused at once.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("aidkd.engine")

LOCK_NAME = ".aidkd.lock"
RESUMABLE = ("last.ckpt", "interrupted.ckpt")
# What a run writes into its folder: the only entries ``overwrite`` removes.
RUN_OUTPUTS = ("config.yaml", "model_best.pt", "model_last.pt", "best_metrics.json", "final_metrics.json",
               "metrics_history.jsonl", "aid_weights.jsonl", "analysis", "checkpoints", "tb", "data_check.json",
               "csv")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (not empty, nothing to resume, locked by another run)."""


def is_rank_zero_process() -> bool:
    """False in the extra processes of a distributed run (they re-run the command; only rank 0 owns the folder)."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def _newest_checkpoint(folder: Path) -> Path | None:
    found = [folder / "checkpoints" / n for n in RESUMABLE if (folder / "checkpoints" / n).is_file()]
    found += [folder / n for n in RESUMABLE if folder.name == "checkpoints" and (folder / n).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_resume(output_dir: str | Path, resume: str | Path | bool | None,
                   missing_ok: bool = False) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None) for ``resume`` (see the module doc)."""
    out_dir = Path(output_dir)
    if resume is None or resume is False:
        return out_dir, None
    if resume is True or resume in ("auto", "last"):
        folder = out_dir
    else:
        target = Path(resume)
        if target.is_file():
            return out_dir, target
        if not target.is_dir():
            raise FileNotFoundError(f"--resume {target}: no such run folder or checkpoint file")
        folder = target.parent if target.name == "checkpoints" else target
    ckpt = _newest_checkpoint(folder)
    if ckpt is None:
        if not missing_ok:
            raise RunFolderError(
                f"--resume: nothing to resume in {folder} (no checkpoints/last.ckpt or interrupted.ckpt); check the "
                "run folder (output_dir), or start a new run without --resume")
        log.info("nothing to resume in %s: starting a new run", folder)
    if folder.resolve() != out_dir.resolve():
        log.info("resuming the run folder %s (the config's output_dir is %s)", folder, out_dir)
    return folder, ckpt


def _contents(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def check_run_folder(folder: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse a new run in a folder that holds anything (unless ``overwrite``); reads, never writes."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"output_dir {folder} is a file, not a folder")
    if resuming or overwrite:
        return
    entries = _contents(folder)
    if entries:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise RunFolderError(
            f"output_dir {folder} is not empty ({shown}); resume that run with --resume, choose another output_dir "
            "(--set output_dir=...), or replace it with --overwrite")


def clear_previous_run(folder: Path) -> None:
    removed = [n for n in RUN_OUTPUTS if (folder / n).exists()]
    for name in removed:
        p = folder / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if removed:
        log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), folder)


def remove_partial_files(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes a kill interrupted (``.NAME.XXXX.tmp``, see save_checkpoint)."""
    partial = [p for d in (folder, folder / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
    if partial:
        size = sum(p.stat().st_size for p in partial)
        for p in partial:
            p.unlink()
        log.info("removed %d partial checkpoint file(s) (%.1f MB) left by an interrupted write in %s", len(partial),
                 size / 1e6, folder)


class RunFolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.aidkd.lock``, released when the process ends."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock (documented)
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunFolderError(f"output_dir {self.path.parent} is in use by another aidkd run (it holds "
                                 f"{self.path}); wait for it to finish or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
