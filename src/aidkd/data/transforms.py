"""Keep-ratio resize and horizontal flip for detection samples (boxes xyxy, pixels).

The resize rule is torchvision's ``GeneralizedRCNNTransform`` rule,
``scale = min(min_size / short_side, max_size / long_side)``; the output size is ``round(side * scale)`` so that
the resized image itself satisfies the rule with scale exactly 1 (the model's own resize is then the identity).
"""
from __future__ import annotations

import torch
from PIL import Image

__all__ = [
    "clip_boxes",
    "hflip_boxes",
    "hflip_image",
    "resize_image",
    "resize_scale",
    "resize_tensor",
    "resized_size",
    "scale_boxes",
]


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """``min(min_size / short, max_size / long)`` (torchvision's rule)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    short, long = min(height, width), max(height, width)
    return min(float(min_size) / short, float(max_size) / long)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """``(new_height, new_width, scale)``; the short side becomes ``min_size`` unless the long one would
    exceed ``max_size``."""
    s = resize_scale(height, width, min_size, max_size)
    return max(1, round(height * s)), max(1, round(width * s)), s


def resize_image(img: Image.Image, min_size: int, max_size: int) -> tuple[Image.Image, float, tuple[float, float]]:
    """Resize a PIL image keep-ratio; returns ``(image, scale, (sx, sy))`` where ``sx = new_w / w`` and
    ``sy = new_h / h`` are the exact per-axis factors (equal to ``scale`` up to rounding of the output size)."""
    w, h = img.size
    nh, nw, s = resized_size(h, w, min_size, max_size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    return img, s, (nw / w, nh / h)


def resize_tensor(image: torch.Tensor, min_size: int, max_size: int
                  ) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """Resize a float CHW image keep-ratio with the interpolation of torchvision's ``GeneralizedRCNNTransform``
    (bilinear, ``align_corners=False``, no antialiasing), so training images are made the way the model (and its
    ONNX graph) resizes at inference. Returns ``(image, scale, (sx, sy))`` as :func:`resize_image`."""
    h, w = image.shape[-2:]
    nh, nw, s = resized_size(h, w, min_size, max_size)
    if (nh, nw) != (h, w):
        image = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                                align_corners=False)[0]
    return image, s, (nw / w, nh / h)


def scale_boxes(boxes: torch.Tensor, sx: float, sy: float | None = None) -> torch.Tensor:
    """Multiply xyxy boxes by per-axis factors (``sy`` defaults to ``sx``)."""
    sy = sx if sy is None else sy
    f = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
    return boxes * f


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror xyxy boxes in an image of ``width`` pixels: ``x1' = W - x2``, ``x2' = W - x1``."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def hflip_image(img: torch.Tensor) -> torch.Tensor:
    """Flip a CHW tensor left-right."""
    return img.flip(-1)
