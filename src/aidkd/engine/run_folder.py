"""The run folder's rules: what ``--resume`` resumes, which folders a new run may use, and one run per folder.

- A new run needs an empty (or missing) ``output_dir``. It starts by writing the run record ``.aidkd-run.json``: the
  top-level entries of the folder that aidkd writes (``RUN_OUTPUTS``; other aidkd writers add theirs with
  ``record_run_file``). ``overwrite=True`` removes exactly the recorded entries, and refuses (touching nothing) a
  folder without a record, one holding any unrecorded entry, or one holding a symbolic link (aidkd makes none).
- A folder holding only a run's start-up files (killed before its first checkpoint) may start anew when the caller
  allows it (``--resume-or-new``); partial checkpoint files (``.NAME.XXXX.tmp``) never count as contents.
- ``resume`` is a run folder, a checkpoint file, or ``True`` / ``"auto"`` for the config's ``output_dir``; finding
  no checkpoint is an error unless ``missing_ok`` (then a new run starts, under the new-run rule).
- Other commands' outputs (``check_output_file``, ``claim_output_folder``): a named output file that exists is
  replaced only with ``force``, an output equal to an input is refused, and an output folder must be new, empty,
  or one aidkd made (marked by ``.aidkd-output``).
- While a run trains, its process holds an exclusive ``flock`` on ``<output_dir>/.aidkd.lock``; a second run on the
  same folder is refused at once.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("aidkd.engine")

LOCK_NAME = ".aidkd.lock"
RESUMABLE = ("last.ckpt", "interrupted.ckpt")
RUN_RECORD = ".aidkd-run.json"
# What a run writes into its folder: recorded when it starts, so that ``overwrite`` may remove them.
RUN_OUTPUTS = ("config.yaml", "model_best.pt", "model_last.pt", "best_metrics.json", "final_metrics.json",
               "metrics_history.jsonl", "aid_weights.jsonl", "analysis", "checkpoints", "tb", "data_check.json",
               "csv", "split", "train_time.json")
# What a run has written before its first checkpoint (config, its split, the data stamp, loggers' folders, the
# checkpoint folder)
START_UP_FILES = ("config.yaml", "split", "data_check.json", "csv", "tb", "checkpoints")


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


def _is_partial(p: Path) -> bool:
    """A temporary file of a checkpoint write a kill interrupted (``.NAME.XXXX.tmp``, see save_checkpoint)."""
    return p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file() and not p.is_symlink()


def _contents(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME and not _is_partial(p))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def recorded_entries(folder: Path) -> set[str] | None:
    """The entries the folder's run record lists (None: no readable record, not a folder aidkd made)."""
    try:
        record = json.loads((Path(folder) / RUN_RECORD).read_text())
        return {str(n) for n in record["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(folder: Path, entries: set[str]) -> None:
    tmp = folder / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps({"entries": sorted(entries)}, indent=1) + "\n")
    os.replace(tmp, folder / RUN_RECORD)


def start_run_record(folder: Path) -> None:
    """Record, as a new run starts in its (empty or cleared) folder, the entries the run will write there."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    _write_record(Path(folder), set(RUN_OUTPUTS))


def record_run_file(folder: str | Path, name: str) -> None:
    """Add ``name`` (a file or folder directly in the run folder, written by aidkd) to the run record, so that
    ``--overwrite`` may remove it. Creates the record when the folder has none."""
    folder = Path(folder)
    if "/" in name or name in ("", ".", "..", LOCK_NAME, RUN_RECORD):
        raise ValueError(f"record_run_file: {name!r} is not an entry of the run folder")
    entries = recorded_entries(folder) or set()
    if name not in entries:
        folder.mkdir(parents=True, exist_ok=True)
        _write_record(folder, entries | {name})


def _links_under(folder: Path, names: list[str]) -> list[str]:
    """Symbolic links among ``names`` or anywhere below them (relative paths; links are not followed)."""
    found = []
    for name in names:
        p = folder / name
        if p.is_symlink():
            found.append(name)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):  # os.walk does not descend into linked folders
                found += [str((Path(root) / n).relative_to(folder)) for n in dirs + files
                          if (Path(root) / n).is_symlink()]
    return found


def _only_start_up_files(folder: Path, entries: list[str]) -> bool:
    """The folder holds a run's start-up files only: killed before its first checkpoint was complete."""
    if recorded_entries(folder) is None or not set(entries) <= {*START_UP_FILES, RUN_RECORD}:
        return False
    ckpts = folder / "checkpoints"
    return not _links_under(folder, entries) and not (
        ckpts.is_dir() and any(not _is_partial(p) for p in ckpts.rglob("*") if not p.is_dir()))


def check_run_folder(folder: Path, resuming: bool, overwrite: bool, restart: bool = False) -> list[str]:
    """Refuse a new run in a folder that holds anything (unless ``overwrite``, or ``restart`` and the folder holds
    only a run's start-up files); reads, never writes. Returns the entries to remove before the new run starts."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"output_dir {folder} is a file, not a folder")
    entries = _contents(folder)
    if resuming or not entries:
        return []
    if overwrite:
        recorded = recorded_entries(folder)
        if recorded is None:
            raise RunFolderError(
                f"--overwrite: output_dir {folder} was not made by an aidkd run (no {RUN_RECORD}) and holds "
                f"{_shown(entries)}; nothing was deleted: empty it yourself or choose another output_dir")
        foreign = [n for n in entries if n not in recorded and n != RUN_RECORD]
        if foreign:
            raise RunFolderError(
                f"--overwrite: output_dir {folder} holds {_shown(foreign)}, which aidkd did not write; nothing was "
                "deleted: move them away or choose another output_dir (--set output_dir=...)")
        links = _links_under(folder, entries)
        if links:
            raise RunFolderError(
                f"--overwrite: output_dir {folder} holds symbolic links ({_shown(links)}), which aidkd never makes; "
                "nothing was deleted: remove them yourself or choose another output_dir")
        return [n for n in entries if n != RUN_RECORD]
    if restart and _only_start_up_files(folder, entries):
        return [n for n in entries if n != RUN_RECORD]
    raise RunFolderError(
        f"output_dir {folder} is not empty ({_shown(entries)}); resume that run with --resume, choose another "
        "output_dir (--set output_dir=...), or replace it with --overwrite")


def clear_previous_run(folder: Path, names: list[str], why: str = "--overwrite") -> None:
    """Remove ``names`` (entries ``check_run_folder`` returned: recorded, free of symbolic links)."""
    for name in names:
        p = folder / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if names:
        log.warning("%s: removed the previous run's %s from %s", why, ", ".join(names), folder)


def remove_partial_files(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes a kill interrupted (``.NAME.XXXX.tmp``, see save_checkpoint)."""
    partial = [p for d in (folder, folder / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp") if _is_partial(p)]
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


OUTPUT_MARK = ".aidkd-output"  # in a folder of predictions aidkd made: it may write there again


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_inputs(path: Path, option: str, inputs) -> None:
    for given in inputs:
        if given is not None and _same_path(path, Path(given)):
            raise RunFolderError(f"{option} {path} is also an input ({given}); choose another output path")


def check_output_file(path: str | Path, option: str, force: bool = False, inputs=(), example: str = "out.json"
                      ) -> Path:
    """The file a command will write (read-only check): refused when it is one of ``inputs``, a folder (the message
    suggests ``example`` in it), or (unless ``force``) an existing file."""
    path = Path(path)
    _refuse_inputs(path, option, inputs)
    if path.is_dir():
        raise RunFolderError(f"{option} {path} is a folder; name the file to write, e.g. {path / example}")
    if (path.exists() or path.is_symlink()) and not force:
        raise RunFolderError(f"{option} {path} exists; add --force to replace it, or choose another file")
    return path


def claim_output_folder(path: str | Path, option: str, inputs=()) -> Path:
    """Make ``path`` the folder of a command's outputs: it must be new, empty or marked by an earlier aidkd command
    (``OUTPUT_MARK``), and not one of ``inputs``; marks it."""
    path = Path(path)
    _refuse_inputs(path, option, inputs)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{option} {path} is a file, not a folder")
    if path.is_symlink():
        raise RunFolderError(f"{option} {path} is a symbolic link; name a folder")
    entries = sorted(p.name for p in path.iterdir() if p.name != OUTPUT_MARK) if path.is_dir() else []
    if entries and not (path / OUTPUT_MARK).is_file():
        raise RunFolderError(f"{option} {path} holds files aidkd did not write ({_shown(entries)}); choose a new or "
                             "empty folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_MARK).touch()
    return path
