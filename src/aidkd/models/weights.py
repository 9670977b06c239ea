"""Detector weights, in one place: reading a file once, finding its state dict, checking it fits, loading, writing.

- Files: ``save_checkpoint`` writes atomically and refuses non-finite weights; ``load_checkpoint`` reads with
  ``torch.load(weights_only=True)``. The Lightning ``CheckpointIO`` (``engine/checkpoint_io.py``) calls both.
- ``read_weights`` reads a local detector file once -- an aidkd model file (``save_model_file``), a Lightning
  checkpoint of ``aidkd train`` / ``aidkd distill``, a plain state dict or a ``.safetensors`` file -- into a
  ``DetectorWeights`` (state dict + metadata, if the file has any).
- ``check_compatible`` is the one compatibility check (classes, arch, backbone, sizes), naming every mismatch.
- ``load_state`` strips the known prefixes (Lightning / DDP) and loads, naming missing / unexpected / misshapen
  tensors; ``check_enum`` / ``enum_state`` do the same for torchvision weight enum names.

``aidkd.models.build`` builds detectors from these (``build_detector(weights=...)``, ``load_detector``).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import get_weight

log = logging.getLogger(__name__)

#: ``format`` of an aidkd model file: ``{"format", "state_dict", "meta", "metrics"}``.
MODEL_FORMAT = "aidkd-model/1"
#: prefixes under which a detector's weights may sit in a checkpoint's state dict (Lightning / DDP; the first is
#: the student's second name in Lightning checkpoints written before it had one name)
STATE_PREFIXES = ("distiller.student.", "student.", "model.", "module.", "detector.")
#: file suffixes that mark ``weights`` as a local file even before it exists (a missing file is then an error,
#: not a torchvision enum look-up)
LOCAL_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin", ".safetensors"}


#: free bytes below which a failed checkpoint write is reported as a full disk
_NEARLY_FULL = 64 * 2 ** 20


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
        if isinstance(e, RuntimeError) and any(w in str(e) for w in ("write", "inline_container", "enforce fail")):
            # torch.save's own I/O errors (its zip writer hides the errno: a full disk reads "unexpected pos")
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            free = shutil.disk_usage(path.parent).free
            if free < _NEARLY_FULL:
                raise OSError(errno.ENOSPC, f"No space left on device ({free // 2 ** 20} MiB free)",
                              str(path)) from e
            raise CheckpointError(f"cannot write checkpoint {path}: {first}") from e
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
                     classes_in_ckpt: Sequence[str] | None, expected_classes: Sequence[str] | None,
                     source: str | os.PathLike | None = None) -> None:
    """Raise ValueError naming every mismatch between a checkpoint and what the config expects.

    Compared: ``arch``, ``backbone``, ``num_classes``, ``fpn_channels`` (each only when both sides give it) and the
    class names (order matters: class i is label i + 1). ``None`` on either side means "unknown" and is not checked.
    ``source`` (the file) starts the message when given.
    """
    problems = []
    if meta_in_ckpt is not None and expected_meta is not None:
        for key in META_KEYS:
            if key in meta_in_ckpt and key in expected_meta and meta_in_ckpt[key] != expected_meta[key]:
                if key == "num_classes":  # users count their classes, not the background
                    problems.append(f"{meta_in_ckpt[key] - 1} classes (+ background) in the checkpoint, "
                                    f"{expected_meta[key] - 1} expected")
                else:
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
        head = f"{source}: " if source is not None else ""
        raise ValueError(f"{head}checkpoint is not compatible with the configuration: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class DetectorWeights:
    """A detector's tensors as read from one file, and the file's metadata (``None``: a bare state dict)."""

    state: dict[str, torch.Tensor]
    meta: dict | None
    source: str


def is_local(weights: str | os.PathLike) -> bool:
    """Whether ``weights`` names a file (existing, or with a checkpoint suffix or a folder) rather than an enum."""
    p = Path(str(weights))
    return p.exists() or p.suffix in LOCAL_SUFFIXES or "/" in str(weights)


def read_weights(path: str | os.PathLike) -> DetectorWeights:
    """Read a local detector file once: its state dict (a ``state_dict`` entry, or the dict itself) and metadata
    (``meta`` of a model file, else ``aidkd_meta`` of a Lightning checkpoint)."""
    path = Path(str(path))
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"detector weights not found: {path}")
        from safetensors.torch import load_file

        try:
            return DetectorWeights(load_file(str(path)), None, str(path))
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    ckpt = load_checkpoint(path)
    meta = next((ckpt[k] for k in ("meta", "aidkd_meta") if isinstance(ckpt.get(k), dict)), None)
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no detector state dict found (expected a state dict or a 'state_dict' entry)")
    return DetectorWeights(state, meta, str(path))


def read_model_file(path: str | os.PathLike) -> DetectorWeights:
    """``read_weights`` for a file that must say how to rebuild its detector (a model file or an aidkd Lightning
    checkpoint: metadata with ``classes``, ``arch``, ``backbone``, sizes)."""
    weights = read_weights(path)
    if not isinstance(weights.meta, dict) or "classes" not in weights.meta:
        raise ValueError(f"{path}: not an aidkd model file or aidkd Lightning checkpoint (no metadata)")
    return weights


def frozen_bn_in(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` comes from a trunk with frozen BatchNorm (trainable BN leaves ``num_batches_tracked``)."""
    return not any("backbone.body." in k and k.endswith("num_batches_tracked") for k in state)


# ---------------------------------------------------------------------------------------------- loading
def select_state(model: nn.Module, state: dict) -> dict:
    """The candidate (as is, or with a known prefix stripped) that covers the most of the model's keys."""
    want = set(model.state_dict())
    best, best_hits = state, len(want & set(state))
    for prefix in STATE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        hits = len(want & set(sub))
        if hits > best_hits:
            best, best_hits = sub, hits
    return best


def load_state(model: nn.Module, state: dict, source: str, new_classes: bool = False) -> None:
    """Load ``state`` into ``model`` (prefixes stripped), refusing any missing, unexpected or misshapen tensor --
    except, with ``new_classes``, the class-dependent output layers, which keep their fresh initialisation."""
    state = select_state(model, state)
    own = model.state_dict()
    # BatchNorm vs FrozenBatchNorm: the only difference in keys is num_batches_tracked; either way is fine to load
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    fresh = []
    if new_classes and not missing and not unexpected:
        # Another class set changes only the output (first) dimension of the class-dependent layers; any other
        # difference means another architecture and stays an error below.
        fresh = [k for k in mismatched if own[k].shape[1:] == state[k].shape[1:]]
        state = {k: v for k, v in state.items() if k not in fresh}
        mismatched = [k for k in mismatched if k not in fresh]
    shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
    if missing or unexpected or shape:
        raise ValueError(f"weights {source} do not fit this detector: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}, shape mismatches {shape[:5]}")
    if fresh:
        log.warning("weights %s: another class set; %d class-dependent tensors start fresh: %s", source, len(fresh),
                    ", ".join(fresh))
    model.load_state_dict(state, strict=False)


def check_enum(name: str, arch: str, backbone: str, num_classes: int | None, fpn_channels: int) -> None:
    """Refuse a torchvision weight enum name that is unknown or made for another detector / class count / width."""
    try:
        w = get_weight(name)
    except Exception as e:
        raise ValueError(f"weights {name!r} is neither an existing file nor a torchvision weight enum name "
                         f"(e.g. 'RetinaNet_ResNet50_FPN_Weights.COCO_V1'): {e}") from e
    enum = type(w).__name__.lower()  # e.g. retinanet_resnet50_fpn_weights
    if not enum.startswith(f"{arch}_{backbone}_fpn_weights"):
        raise ValueError(f"torchvision weights {name} are for a different detector than {arch} + {backbone} "
                         f"(torchvision's {type(w).__name__}); use a local checkpoint instead")
    n = len(w.meta.get("categories", []))
    if num_classes is not None and n != num_classes:
        raise ValueError(f"torchvision weights {name} have {n - 1} classes (+ background), the detector "
                         f"{num_classes - 1}")
    if fpn_channels != 256:
        raise ValueError(f"torchvision weights {name} need fpn_channels=256, got {fpn_channels}")


def enum_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision weight enum name (downloads once into torch's cache)."""
    return get_weight(name).get_state_dict(progress=True)


# ---------------------------------------------------------------------------------------------- model files
def model_meta(model: nn.Module, classes: list[str], min_size: int, max_size: int, kwargs: dict) -> dict:
    """What it takes to rebuild ``model``: its ``aidkd_meta`` plus class names, input size and detector kwargs."""
    return {**model.aidkd_meta, "classes": list(classes), "min_size": min_size, "max_size": max_size,
            "kwargs": dict(kwargs)}


def save_model_file(path: str | os.PathLike, model: nn.Module, meta: dict, metrics: dict | None = None) -> Path:
    """Write an aidkd model file (``MODEL_FORMAT``): the weights on the CPU, ``meta`` and float ``metrics``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": MODEL_FORMAT, "state_dict": state, "meta": meta,
                           "metrics": {k: float(v) for k, v in (metrics or {}).items()}})
    return Path(path)
