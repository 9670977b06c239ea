"""Adaptive Instance Distillation (Lan & Tian, arXiv 2201.11097): weight distillation by how well the teacher does.

An instance the teacher handles well (low own detection loss D^T against the ground truth) keeps a weight near 1;
one it gets wrong is down-weighted, ``w = exp(-alpha * D^T)``. AID is a weighting that composes with any method in
this package: ``AIDWeighting.make`` turns the teacher's losses into the ``pixel_weights`` / ``image_weights`` /
``level_weights`` of ``DistillInputs`` (see ``aidkd.distill.base`` for how each method applies them).

Granularities (``AIDWeighting.granularity``):

- ``"instance"`` (default; the paper's wording): one D^T per ground-truth box. Pixel maps per level hold the box's
  weight on its footprint (``instance_pixel_weights``: cell-centre rule, smallest box wins; a box covering no cell
  centre takes its centre cell only if no other box covers it) and 1 on background;
  ``image_weights`` (for global terms) are the mean instance weight of each image (1 for an image without boxes).
- ``"image"``: one D^T per image, the mean of its instances' losses (0, hence weight 1, without boxes). The image
  weight scales *all* terms of that image: the pixel maps are filled with it everywhere (background included) and it
  is the image's ``image_weights`` entry.
- ``"batch"``: one weight for the whole batch, the mean of its instances' weights (1 without boxes), on every term
  of every image, background included: AID's weakening of KD without its contrast between instances. A control for
  ablations (how much of AID's effect a uniformly weaker KD gives), not a method of the paper.
- ``"level"``: the published code's behaviour: one weight per FPN level for the whole batch from the teacher's
  per-level loss, applied to all terms of that level (``pixel_weights`` and ``image_weights`` are ``None``). The
  per-level loss counts the level's *positive* locations / anchors only, normalised like the detector, in every
  family (RetinaNet, FCOS, GFL, Faster R-CNN: RPN positives plus the RoI head's positive mean), so it measures how
  well the teacher fits the objects alike everywhere. (The published GFL code's per-level loss also holds the
  negatives' QFL; a level with few objects would then be weighted by its background.)

``global_terms`` (not in the paper; default ``"image_mean"``): what the global terms take under ``instance``
granularity. ``"image_mean"``: the image's mean instance weight, on the whole term. ``"pixel"``: every global term
with a per-location residual (spatial attention transfer, the non-local output, FGD's spatial attention and global
terms) takes the instance pixel map per location, as the pixel-wise terms do, so the student imitates the teacher
less at a low-weight instance's footprint and no less elsewhere; terms with no location (channel attention
transfer, FGD's channel attention) keep the image mean. The maps reach the methods as
``DistillInputs.location_weights`` (``AIDWeighting.location_weights``). ``image`` and ``batch`` maps are constant
per image, so there the two settings agree; ``level`` has no maps.

``normalize`` (not in the paper; default off): divide each batch's weights by their mean (over the batch's
instances, images or levels, as the granularity applies them), so they average 1. The weights in (0, 1] also lower
the distillation's overall strength (mean 0.86 at alpha 0.1 on the demo's set); normalised, only their contrast --
which instances get more of it than others -- acts, and a larger alpha sharpens the contrast without weakening KD.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from aidkd.models.targets import pad_per_image

from .base import box_cell_owner_levels, split_levels

Granularity = Literal["instance", "image", "batch", "level"]
GRANULARITIES: tuple[str, ...] = ("instance", "image", "batch", "level")
GlobalTerms = Literal["image_mean", "pixel"]
GLOBAL_TERMS: tuple[str, ...] = ("image_mean", "pixel")


def aid_weights(teacher_loss: Tensor, alpha: float = 0.1) -> Tensor:
    """``exp(-alpha * teacher_loss)``, detached.

    Losses are clamped at 0 first (a detection loss is >= 0; a slightly negative value from numerical error would
    otherwise give a weight > 1), so weights lie in (0, 1] for finite losses and fall monotonically with the loss;
    an infinite loss gives 0 and NaN propagates.
    """
    if alpha < 0:
        raise ValueError(f"AID alpha must be >= 0, got {alpha}")
    return torch.exp(-alpha * teacher_loss.detach().clamp(min=0))


def instance_pixel_weights(
    boxes: Sequence[Tensor],
    weights: Sequence[Tensor],
    height: int,
    width: int,
    stride: float,
) -> Tensor:
    """Per-pixel instance weights of one FPN level: (B, H, W), float32.

    boxes: per image (N_i, 4) xyxy in input pixels; weights: per image (N_i,). A cell belongs to box k when its
    centre ``((x + 0.5) * stride, (y + 0.5) * stride)`` lies inside (``x1 <= cx < x2``, ``y1 <= cy < y2``); where
    boxes overlap the smallest box (area) wins. A box that covers no cell centre claims the cell holding its own
    centre (clamped into the map) only if no box covers that cell; where several such boxes claim one cell, the
    smallest wins. Cells of no box get 1. Vectorised over images, boxes and cells.
    """
    if len(boxes) != len(weights):
        raise ValueError(f"instance_pixel_weights: {len(boxes)} box tensors but {len(weights)} weight tensors")
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    for b, (image_boxes, image_weights) in enumerate(zip(boxes, weights)):
        if image_boxes.shape[0] != image_weights.shape[0]:
            raise ValueError(f"instance_pixel_weights: image {b} has {image_boxes.shape[0]} boxes but "
                             f"{image_weights.shape[0]} weights")
    if not len(boxes):
        return torch.ones((0, height, width), dtype=torch.float32, device=device)
    return _padded_pixel_weights_levels(*_padded_boxes_and_weights(boxes, weights, device), [(height, width)],
                                        [stride])[0]


def _padded_boxes_and_weights(boxes: Sequence[Tensor], weights: Sequence[Tensor], device: torch.device
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """The batch padded to its largest box count: boxes (B, M, 4), their mask (B, M), weights (B, M)."""
    padded, valid = pad_per_image([image_boxes.to(device=device, dtype=torch.float32) for image_boxes in boxes])
    w, _ = pad_per_image([image_weights.to(device=device, dtype=torch.float32) for image_weights in weights])
    return padded, valid, w.detach()


def _padded_pixel_weights_levels(boxes: Tensor, valid: Tensor, weights: Tensor, shapes: Sequence[tuple[int, int]],
                                 strides: Sequence[float]) -> list[Tensor]:
    """:func:`instance_pixel_weights` of a padded batch, every level (``shapes`` [(H, W)], ``strides``) in one batched
    op: as many ops whatever the batch size and the number of levels."""
    owner = box_cell_owner_levels(boxes, valid, list(shapes), list(strides))  # (B, C)
    return split_levels(torch.where(owner >= 0, weights.gather(1, owner.clamp(min=0)), 1.0), list(shapes))


class AIDWeights(NamedTuple):
    """Result of ``AIDWeighting.make``; unpacks as ``pixel_weights, image_weights, level_weights``."""

    pixel_weights: list[Tensor] | None
    image_weights: Tensor | None
    level_weights: Tensor | None


@dataclass
class AIDWeighting:
    """Turns the teacher's own detection losses into AID weights.

    granularity: ``"instance"`` | ``"image"`` | ``"batch"`` | ``"level"`` (module docstring). alpha: the rate in
    ``exp(-alpha * D^T)`` (paper: 0.1). Every method applies the weights linearly (``aidkd.distill.base``): an
    instance of weight w gets w times the gradient of an unweighted one, so alpha means the same in every method.
    """

    granularity: Granularity = "instance"
    alpha: float = 0.1
    #: divide each batch's weights by their mean (module docstring)
    normalize: bool = False
    #: head methods: classification terms weighted by exp(-alpha D^T_cls), box terms by exp(-alpha D^T_box)
    #: (``aidkd.distill.head``); feature methods keep exp(-alpha D^T)
    decoupled: bool = False
    #: ``"image_mean"`` | ``"pixel"``: what the global terms with a per-location residual take (module docstring)
    global_terms: GlobalTerms = "image_mean"
    #: instance weights (per image (N_i,)) of the last ``make`` call, for logging/visualisation; not configuration
    last_instance_weights: list[Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown AID granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if not self.alpha >= 0:
            raise ValueError(f"AID alpha must be >= 0, got {self.alpha}")
        if self.global_terms not in GLOBAL_TERMS:
            raise ValueError(f"unknown AID global_terms {self.global_terms!r}; expected one of {GLOBAL_TERMS}")

    def instance_weights(self, per_instance_losses: Sequence[Tensor]) -> list[Tensor]:
        """Per image (N_i,) instance weights ``exp(-alpha * D^T)`` (divided by the batch's mean with ``normalize``)."""
        if not len(per_instance_losses):
            return []
        # all images' instances at once, split back per image
        weights = aid_weights(torch.cat([losses.flatten() for losses in per_instance_losses]), self.alpha)
        if self.normalize:
            weights = weights * _inverse_mean(weights)
        return list(weights.split([losses.numel() for losses in per_instance_losses]))

    def location_weights(self, weights: AIDWeights) -> list[Tensor] | None:
        """The per-location maps the global terms take (``DistillInputs.location_weights``): the pixel maps with
        ``global_terms`` ``"pixel"``, else None (the global terms take ``image_weights``)."""
        return weights.pixel_weights if self.global_terms == "pixel" else None

    def _level_or_image_weights(self, losses: Tensor) -> Tensor:
        weights = aid_weights(losses, self.alpha)
        return weights * _inverse_mean(weights) if self.normalize else weights

    def instance_weights_of_last_batch(self, index: int) -> Tensor | None:
        """The (N_i,) instance weights of image ``index`` of the last ``make`` call (None before any, or when the
        granularity is ``level`` and no per-instance losses were given)."""
        if self.last_instance_weights is None or index >= len(self.last_instance_weights):
            return None
        return self.last_instance_weights[index]

    @torch.no_grad()
    def make(
        self,
        per_instance_losses: Sequence[Tensor] | None,
        per_level_losses: Tensor | None,
        boxes: Sequence[Tensor],
        feature_shapes: Sequence[tuple[int, int]],
        strides: Sequence[int],
        batch_size: int,
    ) -> AIDWeights:
        """Weights for one batch.

        per_instance_losses: per image (N_i,) teacher losses, one per box of ``boxes`` (instance / image);
        per_level_losses: (L,) teacher loss per level for the whole batch (level); boxes: per image (N_i, 4) xyxy
        input pixels; feature_shapes: per level (H, W); strides: per level. Returns
        ``AIDWeights(pixel_weights, image_weights, level_weights)``: pixel maps per level (B, H, W) and image
        weights (B,) for ``instance`` / ``image`` / ``batch`` (``level_weights`` None), or level weights (L,) for
        ``level`` (the other two None). All detached. (``location_weights`` says which of them the global terms
        take.)
        """
        self.last_instance_weights = (None if per_instance_losses is None
                                      else self.instance_weights(per_instance_losses))
        num_levels = len(feature_shapes)
        if len(strides) != num_levels:
            raise ValueError(f"AID: {len(strides)} strides for {num_levels} feature shapes")
        if self.granularity == "level":
            if per_level_losses is None:
                raise ValueError("AID granularity 'level' needs per_level_losses (teacher loss per FPN level)")
            if tuple(per_level_losses.shape) != (num_levels,):
                raise ValueError(f"AID: per_level_losses shape {tuple(per_level_losses.shape)} != ({num_levels},)")
            return AIDWeights(None, None, self._level_or_image_weights(per_level_losses).to(torch.float32))

        if per_instance_losses is None:
            raise ValueError(f"AID granularity {self.granularity!r} needs per_instance_losses")
        if len(per_instance_losses) != batch_size or len(boxes) != batch_size:
            raise ValueError(f"AID: batch of {batch_size} images but {len(per_instance_losses)} per-instance loss "
                             f"tensors and {len(boxes)} box tensors")
        for b, (losses, image_boxes) in enumerate(zip(per_instance_losses, boxes)):
            if losses.dim() != 1 or losses.shape[0] != image_boxes.shape[0]:
                raise ValueError(f"AID: image {b} has {image_boxes.shape[0]} boxes but teacher losses of shape "
                                 f"{tuple(losses.shape)}")
        device = boxes[0].device if batch_size else torch.device("cpu")
        if self.granularity == "instance":
            weights = self.last_instance_weights
            assert weights is not None
            image_weights = _per_image_mean(weights, empty_value=1.0, device=device)
            pixel_weights = _padded_pixel_weights_levels(*_padded_boxes_and_weights(boxes, weights, device),
                                                         feature_shapes, strides)
            return AIDWeights(pixel_weights, image_weights, None)
        if self.granularity == "image":
            # D^T of an image = mean of its instances' losses (0 without boxes -> weight 1)
            image_weights = self._level_or_image_weights(_per_image_mean(per_instance_losses, empty_value=0.0,
                                                                         device=device))
        else:  # batch: the mean instance weight of the batch, on every image (1 without boxes)
            weights = self.last_instance_weights
            assert weights is not None
            flat = torch.cat([w.flatten().to(device=device, dtype=torch.float32) for w in weights])
            mean = flat.mean() if flat.numel() else torch.ones((), device=device)
            image_weights = mean.expand(batch_size).contiguous()
        pixel_weights = [image_weights[:, None, None].expand(batch_size, h, w).contiguous()
                         for h, w in feature_shapes]
        return AIDWeights(pixel_weights, image_weights, None)

    @torch.no_grad()
    def stats(self, per_instance_losses: Sequence[Tensor] | None = None,
              per_level_losses: Tensor | None = None) -> dict[str, float]:
        """Logging statistics of what this granularity actually applies, beside the teacher losses behind it.

        ``instance`` / ``image``: the teacher's per-instance losses D^T (``teacher_loss_*``) and their weights
        (``instance_w_*``), plus the image weights for ``image`` (``image_w_*``). ``level``: the per-level losses
        (``teacher_loss_level_*``) and the level weights that are applied (``level_w_*``); no instance weights,
        which that granularity never applies. Each as ``_mean``, ``_min``, ``_max``, ``_q10``, ``_q50``, ``_q90``
        and ``_count``. Missing inputs are skipped; empty sets give no keys. Calls ``.item()`` (a device sync):
        log, not per op."""
        stats: dict[str, float] = {}

        def add(prefix: str, values: Tensor) -> None:
            values = values.detach().to(torch.float32).flatten()
            if values.numel() == 0:
                return
            q = torch.quantile(values, values.new_tensor([0.1, 0.5, 0.9]))
            for key, value in (("mean", values.mean()), ("min", values.min()), ("max", values.max()),
                               ("q10", q[0]), ("q50", q[1]), ("q90", q[2])):
                stats[f"{prefix}_{key}"] = value.item()
            stats[f"{prefix}_count"] = float(values.numel())

        if self.granularity == "level":
            if per_level_losses is not None:
                add("teacher_loss_level", per_level_losses)
                add("level_w", self._level_or_image_weights(per_level_losses))
            return stats
        if per_instance_losses is not None and len(per_instance_losses):
            losses = torch.cat([v.detach().flatten().to(torch.float32) for v in per_instance_losses])
            add("teacher_loss", losses)
            add("instance_w", torch.cat([w.flatten() for w in self.instance_weights(per_instance_losses)]))
            if self.granularity == "batch":
                add("batch_w", torch.cat([w.flatten() for w in self.instance_weights(per_instance_losses)]).mean())
            if self.granularity == "image":
                device = per_instance_losses[0].device
                add("image_w", self._level_or_image_weights(_per_image_mean(per_instance_losses, 0.0, device)))
        return stats


def _inverse_mean(weights: Tensor) -> Tensor:
    """1 / mean of ``weights`` (a scalar tensor); 1 where there is nothing to normalise (no weights, or a mean of 0
    from all-infinite losses, or a NaN), so normalising never invents weight that was not there."""
    if not weights.numel():
        return weights.new_ones((), dtype=torch.float32)
    mean = weights.to(torch.float32).mean()  # a tensor, not .item(): no device sync per step
    return torch.where(torch.isfinite(mean) & (mean > 0), mean.reciprocal(), torch.ones_like(mean))


def _per_image_mean(values: Sequence[Tensor], empty_value: float, device: torch.device) -> Tensor:
    """(B,) float32: the mean of each image's values, ``empty_value`` for an image with none (batched: the values
    padded, a mask beside)."""
    if not len(values):
        return torch.zeros(0, device=device)
    padded, valid = pad_per_image([v.to(device=device, dtype=torch.float32).flatten() for v in values])
    counts = valid.sum(dim=1)
    means = padded.detach().sum(dim=1) / counts.clamp(min=1)
    return torch.where(counts > 0, means, torch.full_like(means, empty_value))
