"""Targets and ignore regions as every detector (and its ops) sees them: checks, input preparation, the ignore rule.

Shared by the model files (``aidkd.models.gfl``) and the detector ops (``aidkd.models.ops``); imports neither, so
the models can use it without an import circle. Public through ``aidkd.models.ops`` as well.

Ignore regions (``target["ignore_boxes"]``, Float[M, 4] in input-tensor pixels): an anchor / location / RPN anchor /
RoI proposal that the detector's own matcher leaves as *background* and whose **centre lies inside an ignore box**
(borders included) becomes "ignored" (torchvision's ``BETWEEN_THRESHOLDS``, or label -1 for the samplers): it is
neither positive nor negative, so it adds no classification loss and is never sampled. Positives are never changed.
The centre rule was chosen over IoU because ignore regions (KITTI DontCare, crowds) are often much larger than the
anchors inside them, whose IoU with the region is then tiny.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

BELOW_LOW_THRESHOLD = -1  # background (torchvision Matcher)
BETWEEN_THRESHOLDS = -2  # ignored (torchvision Matcher)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DDP / DataParallel wrappers (the model itself when unwrapped)."""
    # torch.compile wraps in OptimizedModule (._orig_mod); DDP/DataParallel in .module
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None)
        if inner is None:
            return model
        model = inner
    return model


def prepare_inputs(model: nn.Module, images: list[Tensor], targets: list[dict] | None = None
                   ) -> tuple[ImageList, list[dict] | None]:
    """``model.transform(images, targets)``, plus ``ignore_boxes`` rescaled like ``boxes``.

    torchvision's transform resizes ``boxes`` only; when the dataset already resized the image (the aidkd
    convention) the scale is 1 and this changes nothing, otherwise the ignore boxes would be in the wrong pixels.
    """
    model = unwrap_model(model)
    sizes = [tuple(img.shape[-2:]) for img in images]
    image_list, out = model.transform(images, targets)
    if out is not None:
        for t, old, new in zip(out, sizes, image_list.image_sizes):
            ign = t.get("ignore_boxes")
            if isinstance(ign, Tensor) and ign.numel() and tuple(old) != tuple(new):
                t["ignore_boxes"] = resize_boxes(ign.reshape(-1, 4).float(), old, new)
    return image_list, out


def check_targets(targets: list[dict]) -> None:
    """Shape/consistency checks (torchvision's forward makes the same ones); raises ValueError.

    Box values (positive width and height) are checked only where they live in host memory: reading a device
    tensor would stall the device every step. Training data is checked on the host before it moves
    (``DetectionDataset`` drops empty boxes; ``DetectionDataModule.on_before_batch_transfer`` calls this)."""
    if targets is None:
        raise ValueError("targets are required to compute losses")
    on_host = []
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a Float[N, 4] tensor, got "
                             f"{getattr(boxes, 'shape', type(boxes))}")
        labels = t.get("labels")
        if not isinstance(labels, Tensor) or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"target {i}: 'labels' must be an Int64[N] tensor with N = {boxes.shape[0]}")
        if boxes.numel() and boxes.device.type == "cpu":
            on_host.append((i, boxes))
    if on_host and bool(_empty_boxes(torch.cat([b for _, b in on_host])).any()):
        for i, boxes in on_host:
            bad = torch.where(_empty_boxes(boxes))[0]
            if bad.numel():
                j = int(bad[0])
                raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} has no positive width and height")


def _empty_boxes(boxes: Tensor) -> Tensor:
    return (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)


def ignore_boxes_of(target: dict) -> Tensor | None:
    ign = target.get("ignore_boxes")
    if not isinstance(ign, Tensor) or ign.numel() == 0:
        return None
    return ign if ign.dim() == 2 else ign.reshape(-1, 4)


def centres_in_boxes(points: Tensor, boxes: Tensor, chunk: int = 65536) -> Tensor:
    """Bool[A]: whether each point (Float[A, 2], x y) lies inside any of ``boxes`` (Float[M, 4], borders count)."""
    out = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    if boxes.numel() == 0 or points.numel() == 0:
        return out
    boxes = boxes.to(points)
    for s in range(0, points.shape[0], chunk):
        p = points[s:s + chunk]
        x, y = p[:, 0:1], p[:, 1:2]
        inside = (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])
        out[s:s + chunk] = inside.any(dim=1)
    return out


def box_centres(boxes: Tensor) -> Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def ignore_background(matched_idxs: Tensor, anchors: Tensor, ignore_boxes: Tensor | None) -> Tensor:
    """Matched indices with background (``-1``) entries centred inside an ignore box set to ``-2`` (ignored)."""
    if ignore_boxes is None:
        return matched_idxs
    inside = centres_in_boxes(box_centres(anchors), ignore_boxes)
    return torch.where((matched_idxs == BELOW_LOW_THRESHOLD) & inside,
                       torch.full_like(matched_idxs, BETWEEN_THRESHOLDS), matched_idxs)


# ---------------------------------------------------------------------------------------------- batched targets
def host_tensor(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``values`` (host data) as a tensor on ``device`` without stalling it: a CUDA copy from pinned memory is
    asynchronous, a plain one waits for the device to finish its queue."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def per_level_values(values, num_per_level: list[int], device, dtype: torch.dtype) -> Tensor:
    """``values[l]`` repeated for each of the ``num_per_level[l]`` anchors / locations of level l, built on the
    device from host numbers (no copy, no sync; one op per level)."""
    return torch.cat([torch.full((n,), v, dtype=dtype, device=device) for v, n in zip(values, num_per_level)])


def pad_per_image(values: list[Tensor], min_count: int = 1) -> tuple[Tensor, Tensor]:
    """Per-image tensors ``(N_i, ...)`` as one zero-padded ``(B, M, ...)`` tensor and its Bool ``(B, M)`` mask of
    real entries, ``M = max(N_i, min_count)``. A fixed number of ops whatever the batch size (one concatenation and
    one indexed copy), and no host sync: the sizes are host metadata."""
    sizes = [v.shape[0] for v in values]
    first = values[0]
    B, M = len(values), max([*sizes, min_count])
    slots = host_tensor([b * M + k for b, n in enumerate(sizes) for k in range(n)], first.device)
    flat = first.new_zeros((B * M, *first.shape[1:])).index_copy_(0, slots, torch.cat(values))
    mask = torch.zeros(B * M, dtype=torch.bool, device=first.device).index_fill_(0, slots, True)
    return flat.view(B, M, *first.shape[1:]), mask.view(B, M)


def unpad_per_image(padded: Tensor, sizes: list[int]) -> list[Tensor]:
    """The inverse of :func:`pad_per_image`: ``padded[b, :sizes[b]]`` for every image, in a fixed number of ops."""
    M = padded.shape[1]
    slots = host_tensor([b * M + k for b, n in enumerate(sizes) for k in range(n)], padded.device)
    return list(padded.flatten(0, 1).index_select(0, slots).split(sizes))


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``(B, N, M)`` IoU of ``boxes1`` ``(B, N, 4)`` with ``boxes2`` ``(B, M, 4)`` (either may have B = 1), the same
    arithmetic as ``torchvision.ops.box_iou`` per image."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def ignore_background_batch(matched_idxs: Tensor, anchors: Tensor, targets: list[dict]) -> Tensor:
    """:func:`ignore_background` for a batch: ``matched_idxs`` ``(B, A)``, ``anchors`` ``(A, 4)`` shared by the
    images or ``(B, A, 4)``; each target's ``ignore_boxes`` apply to its image. A fixed number of ops."""
    ignores = [ignore_boxes_of(t) for t in targets]
    if all(g is None for g in ignores):
        return matched_idxs
    ref = next(g for g in ignores if g is not None)
    none = ref.new_zeros((0, 4))
    boxes, valid = pad_per_image([g.to(ref) if g is not None else none for g in ignores])
    centres = ((anchors[..., :2] + anchors[..., 2:]) / 2).to(boxes)
    x, y = centres[..., 0, None], centres[..., 1, None]  # (B or 1, A, 1)
    inside = ((x >= boxes[:, None, :, 0]) & (x <= boxes[:, None, :, 2]) & (y >= boxes[:, None, :, 1])
              & (y <= boxes[:, None, :, 3]) & valid[:, None, :]).any(dim=2)  # (B, A)
    return torch.where((matched_idxs == BELOW_LOW_THRESHOLD) & inside,
                       torch.full_like(matched_idxs, BETWEEN_THRESHOLDS), matched_idxs)


def match_batch(matcher, quality: Tensor, valid: Tensor) -> Tensor:
    """torchvision's ``Matcher`` (``det_utils.Matcher``: high / low thresholds, optional low-quality matches) on
    a padded batch: ``quality`` ``(B, M, A)`` with ``valid`` Bool ``(B, M)`` marking real boxes; returns
    ``Int64[B, A]``, each image's row equal to ``matcher(quality[b, :M_b])`` (all background without boxes)."""
    quality = torch.where(valid[..., None], quality, torch.full_like(quality, -1.0))
    matched_vals, matches = quality.max(dim=1)  # (B, A)
    all_matches = matches
    matches = torch.where(matched_vals < matcher.low_threshold, BELOW_LOW_THRESHOLD,
                          torch.where(matched_vals < matcher.high_threshold, BETWEEN_THRESHOLDS, matches))
    if matcher.allow_low_quality_matches:
        # each box's best elements (ties included) keep their best box, as Matcher.set_low_quality_matches_
        highest = quality.max(dim=2).values  # (B, M)
        best_of_a_box = ((quality == highest[..., None]) & valid[..., None]).any(dim=1)
        matches = torch.where(best_of_a_box, all_matches, matches)
    return matches
