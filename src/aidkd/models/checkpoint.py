"""Safe checkpoint files: atomic writes that refuse non-finite weights, ``weights_only`` loads, compatibility checks."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (corrupt, truncated, or not a plain-tensor checkpoint)."""


class NonFiniteCheckpointError(ValueError):
    """Refusal to write a checkpoint holding NaN or infinite floating-point values."""


def non_finite_entries(state: Any, prefix: str = "", limit: int = 5) -> list[str]:
    """Paths (``a.b.0``) of floating tensors in ``state`` holding NaN or inf (at most ``limit``)."""
    found: list[str] = []

    def walk(obj: Any, path: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
                found.append(path or "<root>")
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
            for i, v in enumerate(obj):
                walk(v, f"{path}.{i}" if path else str(i))

    walk(state, prefix)
    return found


def save_checkpoint(path: str | os.PathLike, state: dict, finite_keys: Sequence[str] | None = None) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder, flushed and fsynced,
    then ``os.replace``d over ``path``. A crash leaves either the old file or the new one, never a partial file.

    Raises ``NonFiniteCheckpointError`` (a ValueError) without touching ``path`` if any floating tensor in ``state``
    (or, with ``finite_keys``, in those top-level entries only) is NaN or infinite.
    """
    path = Path(path)
    checked = state if finite_keys is None else {k: state[k] for k in finite_keys if k in state}
    bad = non_finite_entries(checked)
    if bad:
        raise NonFiniteCheckpointError(f"refusing to write {path}: non-finite values in {', '.join(bad)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno is not None and not e.filename:  # e.g. ENOSPC: say which file
            raise OSError(e.errno, e.strerror, str(path)) from e
        if isinstance(e, RuntimeError) and "write" in str(e):  # torch.save's own I/O errors
            raise CheckpointError(f"cannot write checkpoint {path}: {str(e).splitlines()[0]}") from e
        raise
    try:  # make the rename itself durable (best effort; not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``torch.load(map_location="cpu", weights_only=True)``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for one that cannot be read (truncated,
    corrupt, holding arbitrary pickled objects, or not a dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / EOF errors all mean the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt, truncated, or not a plain-tensor "
                              f"PyTorch checkpoint (only weights_only loading is allowed): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


META_KEYS = ("arch", "backbone", "num_classes", "fpn_channels")


def check_compatible(meta_in_ckpt: Mapping | None, expected_meta: Mapping | None,
                     classes_in_ckpt: Sequence[str] | None, expected_classes: Sequence[str] | None) -> None:
    """Raise ValueError naming every mismatch between a checkpoint and what the config expects.

    Compared: ``arch``, ``backbone``, ``num_classes``, ``fpn_channels`` (each only when both sides give it) and the
    class names (order matters: class i is label i + 1). ``None`` on either side means "unknown" and is not checked.
    """
    problems = []
    if meta_in_ckpt is not None and expected_meta is not None:
        for key in META_KEYS:
            if key in meta_in_ckpt and key in expected_meta and meta_in_ckpt[key] != expected_meta[key]:
                problems.append(f"{key}: checkpoint has {meta_in_ckpt[key]!r}, expected {expected_meta[key]!r}")
    if classes_in_ckpt is not None and expected_classes is not None:
        got, want = list(classes_in_ckpt), list(expected_classes)
        if got != want:
            detail = []
            if len(got) != len(want):
                detail.append(f"{len(got)} classes vs {len(want)}")
            diffs = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(got, want)) if a != b]
            if diffs:
                detail.append("differ at " + ", ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else ""))
            problems.append(f"class names: checkpoint has {got}, expected {want} ({'; '.join(detail)})")
    if problems:
        raise ValueError("checkpoint is not compatible with the configuration: " + "; ".join(problems))
