"""Keep-ratio resize and horizontal flip for detection samples (boxes xyxy, pixels).

The resize rule is torchvision's ``GeneralizedRCNNTransform`` rule,
``scale = min(min_size / short_side, max_size / long_side)``; the output size is ``round(side * scale)`` so that
the resized image itself satisfies the rule with scale exactly 1 (the model's own resize is then the identity).

Training samples are resized where the model runs (:func:`resize_samples`, on the device): the loader workers
hand over uint8 images at their original size, a quarter of the bytes of float32 and none of the CPU time of the
resize.
"""
from __future__ import annotations

import torch
from PIL import Image

from .images import image_to_float

__all__ = [
    "clip_boxes",
    "hflip_boxes",
    "hflip_image",
    "resize_image",
    "resize_sample",
    "resize_samples",
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
    """Resize a float CHW image (or a batch of same-size images, NCHW) keep-ratio with the interpolation of
    torchvision's ``GeneralizedRCNNTransform`` (bilinear, ``align_corners=False``, no antialiasing), so training
    images are made the way the model (and its ONNX graph) resizes at inference. Returns ``(image, scale, (sx,
    sy))`` as :func:`resize_image`."""
    h, w = image.shape[-2:]
    nh, nw, s = resized_size(h, w, min_size, max_size)
    if (nh, nw) != (h, w):
        batch = image if image.dim() == 4 else image[None]
        batch = torch.nn.functional.interpolate(batch, size=(nh, nw), mode="bilinear", align_corners=False)
        image = batch if image.dim() == 4 else batch[0]
    return image, s, (nw / w, nh / h)


PIXEL_FIELDS = ("boxes", "ignore_boxes")  #: the target fields in the pixels of the sample's image


def resize_sample(image: torch.Tensor, target: dict, min_size: int, max_size: int) -> tuple[torch.Tensor, dict]:
    """A sample at its original size (a uint8 image, or a float one in [0, 1]) as the model trains on it, on the
    image's device: the image float32 in [0, 1], resized by :func:`resize_tensor`; every pixel field of the target
    (``PIXEL_FIELDS``) scaled by the exact per-axis factors and clipped to the new size; ``scale`` and ``scale_xy``
    set to the factors. Returns a new target dict (the given one is not changed)."""
    if image.dtype == torch.uint8:
        image = image_to_float(image)
    image, scale, (sx, sy) = resize_tensor(image, min_size, max_size)
    return image, _scaled_target(target, scale, sx, sy, *image.shape[-2:])


def _scaled_target(target: dict, scale: float, sx: float, sy: float, height: int, width: int) -> dict:
    out = dict(target)
    for key in PIXEL_FIELDS:
        if isinstance(out.get(key), torch.Tensor):
            out[key] = clip_boxes(scale_boxes(out[key], sx, sy), height, width)
    out["scale"], out["scale_xy"] = float(scale), (float(sx), float(sy))
    return out


def resize_samples(images: list[torch.Tensor], targets: list[dict], min_size: int, max_size: int
                   ) -> tuple[list[torch.Tensor], list[dict]]:
    """A training batch as the model trains on it: every uint8 image (a ``DetectionDataset(uint8=True)`` sample:
    original size, boxes in its pixels) through :func:`resize_sample`, where it lies (on the device after the
    transfer). Float images are ready (the dataset resized them, or the model's transform will) and stay as they
    are."""
    images, targets = list(images), list(targets)
    # images of one size (most of a KITTI batch) are made float and resized in one call, not one call each
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        if im.dtype == torch.uint8:
            groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        stacked = image_to_float(torch.stack([images[i] for i in idx]))
        resized, scale, (sx, sy) = resize_tensor(stacked, min_size, max_size)
        for i, image in zip(idx, resized.unbind(0)):
            images[i], targets[i] = image, _scaled_target(targets[i], scale, sx, sy, *image.shape[-2:])
    return images, targets


def scale_boxes(boxes: torch.Tensor, sx: float, sy: float | None = None) -> torch.Tensor:
    """Multiply xyxy boxes by per-axis factors (``sy`` defaults to ``sx``), on the boxes' device."""
    sy = sx if sy is None else sy
    # by Python scalars: a factor tensor made on the host would be a blocking copy to the device per call
    out = boxes.clone()
    out[..., 0::2] *= sx
    out[..., 1::2] *= sy
    return out


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
