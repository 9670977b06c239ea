"""Image reading with precise errors.

Every failure to read an image (missing, zero bytes, truncated, corrupt, unexpected size) becomes a
:class:`~aidkd.data.structures.DatasetError` naming the file; no PIL/OS exception escapes.
"""
from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .structures import DatasetError

__all__ = ["check_image", "image_to_float", "image_to_tensor", "image_to_uint8", "read_image",
           "read_image_size"]

# PIL refuses "decompression bombs" above this many pixels; real driving data is far below it.
_MAX_PIXELS = 1 << 28
log = logging.getLogger("aidkd.data")


def _precheck(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError("image file not found", file=path) from None
    except OSError as e:
        raise DatasetError(f"cannot access image file: {e.strerror or e}", file=path) from None
    if not Path(path).is_file():
        raise DatasetError("image path is not a regular file", file=path)
    if st.st_size == 0:
        raise DatasetError("image file is empty (0 bytes)", file=path)


def _check_size(path: Path, size: tuple[int, int], expected_size, source: str | None) -> None:
    if expected_size is None:
        return
    ew, eh = expected_size
    if ew is None or eh is None:
        return
    if (int(ew), int(eh)) != tuple(size):
        where = f" {source}" if source else " the annotation file"
        raise DatasetError(f"image is {size[0]}x{size[1]} (WxH) but{where} declares {int(ew)}x{int(eh)}",
                           file=path)


def read_image_size(path: str | Path, expected_size: tuple[int, int] | None = None,
                    source: str | None = None) -> tuple[int, int]:
    """Return ``(width, height)`` from the image header only (cheap). Raises DatasetError."""
    path = Path(path)
    _precheck(path)
    try:
        with Image.open(path) as im:
            size = (int(im.size[0]), int(im.size[1]))
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad headers
        raise DatasetError(f"unreadable image header ({type(e).__name__}: {e})", file=path) from None
    if size[0] <= 0 or size[1] <= 0:
        raise DatasetError(f"image has empty size {size[0]}x{size[1]}", file=path)
    _check_size(path, size, expected_size, source)
    return size


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit files (and PNG's "I", which only 16-bit data opens as) are scaled by their depth, not their
        # content: a dark 16-bit frame must not be read as a bright 8-bit one
        sixteen = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")
        top = 65535.0 if sixteen or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([arr] * 3, axis=-1), "RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


_EXIF_ORIENTATION = 0x0112
_exif_noted = False


def _note_exif_orientation(im: Image.Image, path: Path) -> None:
    """Images are read in stored pixel order (boxes refer to those pixels); say so once if a file says otherwise."""
    global _exif_noted
    if _exif_noted:
        return
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- a broken EXIF block is not worth failing the image for
        return
    if orientation not in (1, None):
        _exif_noted = True
        log.warning("%s: EXIF orientation %s is ignored; images are read in stored pixel order, which the boxes "
                    "refer to (shown once)", path, orientation)


def _read_bytes(path: Path) -> bytes:
    _precheck(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read image file: {e.strerror or e}", file=path) from None


def _incomplete(data: bytes, fmt: str | None) -> str | None:
    """Why a PNG/JPEG byte string is cut short, or None. Decoders may not notice a missing end marker."""
    if fmt == "PNG":
        i = data.rfind(b"IEND")
        if i < 0 or len(data) < i + 8:
            return "truncated PNG (no complete IEND chunk)"
    elif fmt in ("JPEG", "MPO"):
        sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
        if sos < 0 or eoi < sos:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    return None


def read_image(path: str | Path, expected_size: tuple[int, int] | None = None,
               source: str | None = None, verify: bool = False) -> Image.Image:
    """Fully decode an image into an RGB ``PIL.Image``.

    ``expected_size`` is ``(width, height)`` as declared by an annotation file (``source`` names it in the
    message); a mismatch is an error. PNG/JPEG files cut short are detected even when the decoder would not
    notice (missing IEND / end-of-image marker). ``verify=True`` additionally runs PIL's ``verify()`` (PNG CRC
    checks). Missing, empty, truncated and corrupt files raise :class:`DatasetError` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if verify:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            with Image.open(io.BytesIO(data)) as im:
                problem = _incomplete(data, im.format)
                if problem:
                    raise DatasetError(problem, file=path)
                if im.size[0] * im.size[1] > _MAX_PIXELS:
                    raise ValueError(f"image too large ({im.size[0]}x{im.size[1]})")
                im.load()
                _note_exif_orientation(im, path)
                rgb = _to_rgb(im)
                if rgb is im:
                    rgb = im.copy()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated / corrupt data: OSError, SyntaxError, ValueError, struct.error, ...
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # the file is named already
        raise DatasetError(f"corrupt or truncated image ({type(e).__name__}: {detail})", file=path) from None
    if rgb.size[0] <= 0 or rgb.size[1] <= 0:
        raise DatasetError(f"image has empty size {rgb.size[0]}x{rgb.size[1]}", file=path)
    _check_size(path, rgb.size, expected_size, source)
    return rgb


def check_image(path: str | Path, expected_size: tuple[int, int] | None = None, decode: bool = True,
                source: str | None = None) -> tuple[tuple[int, int] | None, DatasetError | None]:
    """Check one image; returns ``((width, height) or None, error or None)``. ``decode=False`` reads the header."""
    try:
        if decode:
            im = read_image(path, expected_size=expected_size, source=source, verify=True)
            return im.size, None
        return read_image_size(path, expected_size=expected_size, source=source), None
    except DatasetError as e:
        return None, e


def image_to_uint8(im: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image or HxWx3 uint8 array -> ByteTensor[3, H, W] (a channel-first view of a writable copy)."""
    arr = np.array(im, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return torch.from_numpy(arr).permute(2, 0, 1)


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """ByteTensor[3, H, W] -> FloatTensor[3, H, W] in [0, 1], on the image's device."""
    return image.to(torch.float32).div_(255.0)


def image_to_tensor(im: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image or HxWx3 uint8 array -> FloatTensor[3, H, W] in [0, 1]."""
    return image_to_float(image_to_uint8(im))
