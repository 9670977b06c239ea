"""GFL: Generalized Focal Loss detector (Li et al., NeurIPS 2020, arXiv 2006.04388) in torchvision's style.

GFL is ATSS with two changes to the head's outputs and losses:

- the classification branch predicts a *joint* class-quality score (sigmoid), trained with Quality Focal Loss against
  the IoU of the predicted box (positives) or 0 (negatives); there is no separate centerness/IoU branch;
- the regression branch predicts, for each box side, a discrete distribution over ``0..reg_max`` stride units; the
  distance is its expectation (the "integral"), trained with GIoU on the decoded box plus Distribution Focal Loss.

Defaults follow MMDetection's ``gfl_r50_fpn_1x_coco`` (the setting the AID paper trains): one square anchor of
8 strides per location on P3-P7 (strides 8..128), ATSS with topk 9, a 4-conv GroupNorm tower per branch, reg_max 16,
loss weights QFL 1, GIoU 2, DFL 0.25; at test time score threshold 0.05, 1000 candidates per level, NMS at 0.6,
100 detections. Deviations from MMDetection are listed in :class:`GFL`'s docstring.

Losses go through explicit ``matched_idxs`` (:meth:`GFL.compute_loss_terms`) so that the training loss, the
per-instance teacher losses used by Adaptive Instance Distillation and the per-level losses are reductions of the
same per-location numbers (:class:`aidkd.models.ops.gfl.GFLOps`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from aidkd.models.anchor_cache import cached_anchors
from aidkd.models.atss import ATSSAssigner
from aidkd.models.backbones import build_fpn_backbone
from aidkd.models.gfl_losses import (
    DistributionFocalLoss,
    GIoULoss,
    QualityFocalLoss,
    bbox2distance,
    distance2bbox,
    integral,
)
from aidkd.models.targets import (
    BETWEEN_THRESHOLDS,
    check_targets,
    ignore_background,
    ignore_background_batch,
    ignore_boxes_of,
    pad_per_image,
    per_level_values,
    prepare_inputs,
)

__all__ = ["GFL", "GFLHead", "GFLLossTerms", "Scale", "build_gfl"]

DEFAULT_STRIDES = (8, 16, 32, 64, 128)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per pyramid level on the regression output)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _group_norm(channels: int) -> nn.Module:
    # 32 groups (the GFL/FCOS default) for widths >= 64 that allow it. Narrow test/demo FPNs get fewer groups with at
    # least 2 channels each, so that a 1x1 P7 map (tiny images) still has more than one value per group in training.
    return nn.GroupNorm(math.gcd(32, max(channels // 2, 1)), channels)


class GFLHead(nn.Module):
    """The GFL head: shared (across levels) classification and regression towers.

    Args:
        in_channels (int): FPN width.
        num_classes (int): number of joint class-quality outputs (including the never-positive background slot 0).
        num_levels (int): number of pyramid levels (one learnable :class:`Scale` each).
        num_convs (int): conv + norm + ReLU blocks per tower. Default: 4.
        reg_max (int): the distance distribution covers ``0..reg_max`` stride units. Default: 16.
        prior_probability (float): initial foreground probability of the class-quality output. Default: 0.01.
        norm_layer: callable ``channels -> nn.Module``; default GroupNorm with 32 groups (fewer below 64 channels,
            keeping >= 2 channels per group).

    ``forward(features)`` returns ``{"cls_logits": [N, HW, num_classes], "bbox_regression": [N, HW, 4 *
    (reg_max + 1)]}`` with all levels concatenated, finest first (torchvision's layout, one anchor per location).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = len(DEFAULT_STRIDES),
        num_convs: int = 4,
        reg_max: int = 16,
        prior_probability: float = 0.01,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or _group_norm
        self.num_classes = num_classes
        self.reg_max = reg_max

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False), norm_layer(in_channels),
                           nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])

        for module in [*self.cls_convs, *self.reg_convs, self.cls_logits, self.bbox_reg]:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        if len(x) != len(self.scales):
            raise ValueError(f"GFLHead was built for {len(self.scales)} levels but got {len(x)} feature maps")
        all_cls, all_reg = [], []
        for features, scale in zip(x, self.scales):
            cls = self.cls_logits(self.cls_convs(features))
            reg = scale(self.bbox_reg(self.reg_convs(features)))
            n = cls.shape[0]
            all_cls.append(cls.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
            all_reg.append(reg.permute(0, 2, 3, 1).reshape(n, -1, 4 * (self.reg_max + 1)))
        return {"cls_logits": torch.cat(all_cls, dim=1), "bbox_regression": torch.cat(all_reg, dim=1)}


@dataclass
class GFLLossTerms:
    """Unreduced GFL losses, one value per (image, location); ``A`` = locations of all levels, finest first.

    The training loss (:meth:`GFL.reduce_loss_terms`), the per-instance teacher losses and the per-level losses
    (:meth:`GFLOps.instance_losses`, :meth:`GFLOps.level_losses`) are all reductions of these tensors.
    """

    matched_idxs: Tensor  # Int64[B, A]: assigned box index, -1 background, -2 ignored background
    levels: Tensor  # Int64[A]: pyramid level of each location
    qfl: Tensor  # [B, A]: QFL summed over classes; 0 at ignored locations
    bbox: Tensor  # [B, A]: GIoU loss of the decoded box at positives, 0 elsewhere
    dfl: Tensor  # [B, A]: DFL averaged over the four sides at positives, 0 elsewhere
    weight: Tensor  # [B, A]: detached max class-quality score at positives (box/DFL weight), 0 elsewhere
    quality: Tensor  # [B, A]: QFL target (IoU of the decoded box with its box) at positives, 0 elsewhere


class GFL(nn.Module):
    """Implements GFL (Generalized Focal Loss, https://arxiv.org/abs/2006.04388).

    The input to the model is expected to be a list of tensors, each of shape [C, H, W], one for each
    image, and should be in 0-1 range. Different images can have different sizes.

    The behavior of the model changes depending on if it is in training or evaluation mode.

    During training, the model expects both the input tensors and targets (list of dictionary),
    containing:
        - boxes (``FloatTensor[N, 4]``): the ground-truth boxes in ``[x1, y1, x2, y2]`` format, with
          ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
        - labels (``Int64Tensor[N]``): the class label for each ground-truth box (1..num_classes-1; 0 is the
          background slot, which is never positive)
        - ignore_boxes (``FloatTensor[M, 4]``, optional): regions that are neither positive nor negative: a
          background location whose centre lies in one gets no classification loss.

    The model returns a Dict[Tensor] during training, containing ``loss_qfl`` (Quality Focal Loss),
    ``loss_bbox`` (GIoU) and ``loss_dfl`` (Distribution Focal Loss), already weighted.

    During inference, the model requires only the input tensors, and returns the post-processed
    predictions as a List[Dict[Tensor]], one for each input image. The fields of the Dict are as
    follows:
        - boxes (``FloatTensor[N, 4]``): the predicted boxes in ``[x1, y1, x2, y2]`` format, with
          ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
        - labels (Int64Tensor[N]): the predicted labels for each image
        - scores (Tensor[N]): the scores for each prediction (joint class-quality, i.e. an IoU estimate)

    Args:
        backbone (nn.Module): the network used to compute the features for the model.
            It should contain an out_channels attribute, which indicates the number of output
            channels that each feature map has (and it should be the same for all feature maps).
            The backbone should return a single Tensor or an OrderedDict[Tensor], finest level first.
        num_classes (int): number of output classes of the model (including the background).
        min_size (int): Images are rescaled before feeding them to the backbone:
            we attempt to preserve the aspect ratio and scale the shorter edge
            to ``min_size``. If the resulting longer edge exceeds ``max_size``,
            then downscale so that the longer edge does not exceed ``max_size``.
        max_size (int): See ``min_size``.
        image_mean (Tuple[float, float, float]): mean values used for input normalization.
        image_std (Tuple[float, float, float]): std values used for input normalization.
        anchor_generator (AnchorGenerator): one anchor per location. Default: a square anchor of
            ``octave_base_scale * stride`` pixels on each level (64..1024 px for strides 8..128).
        anchor_strides (Sequence[int]): the nominal stride of each level (8, 16, 32, 64, 128). Anchors are laid
            out at these strides and regression distances are measured in these units, as in MMDetection;
            torchvision's AnchorGenerator would instead use ``padded_size // feature_size``, which is not a
            power of two on P6/P7 (e.g. 61 for an 800-pixel side).
        octave_base_scale (float): anchor side in strides for the default anchor generator (8).
        head (nn.Module): Module run on top of the feature pyramid. Default: :class:`GFLHead`.
        reg_max (int): the distance distribution covers ``0..reg_max`` stride units (16).
        assigner (Callable): ``assigner(anchors, num_anchors_per_level, gt_boxes) -> matched_idxs`` (Int64[A],
            -1 for background). Default: :class:`~aidkd.models.atss.ATSSAssigner` (topk 9).
        qfl_loss (Callable): ``(logits[N, C], labels[N], quality[N]) -> [N]``. Default: QFL with beta 2.
        bbox_loss (Callable): ``(pred[P, 4], target[P, 4]) -> [P]`` on boxes in stride units. Default: GIoU.
        dfl_loss (Callable): ``(logits[Q, reg_max + 1], target[Q]) -> [Q]``. Default: DFL.
        qfl_weight, bbox_weight, dfl_weight (float): loss weights (1.0, 2.0, 0.25 as in MMDetection).
        dfl_eps (float): DFL targets are clamped to ``reg_max - dfl_eps`` (0.1 as in the reference code).
        score_thresh (float): Score threshold used for postprocessing the detections.
        nms_thresh (float): NMS threshold used for postprocessing the detections.
        detections_per_img (int): Number of best detections to keep after NMS.
        topk_candidates (int): Number of best (location, class) pairs per level to keep before NMS.

    Differences from MMDetection's GFLHead: ignore regions only remove background locations from QFL (MMDetection
    ignores nothing by default); pre-NMS top-k is over (location, class) pairs per level as in torchvision (MMDetection
    takes the top-k locations by their best class); the QFL normaliser is ``max(positives in the batch, 1)`` of this
    process (MMDetection: the sum over images of ``max(positives, 1)``, averaged across GPUs). As in MMDetection the
    GIoU/DFL normaliser is ``max(sum of score weights, 1)``, so these two losses *rise* over the first steps of
    training from scratch while the scores grow from the 0.01 prior.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        # transform parameters
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        # anchors and head
        anchor_generator: AnchorGenerator | None = None,
        anchor_strides: tuple[int, ...] | list[int] = DEFAULT_STRIDES,
        octave_base_scale: float = 8,
        head: nn.Module | None = None,
        reg_max: int = 16,
        # training
        assigner: Callable[[Tensor, list[int], Tensor], Tensor] | None = None,
        qfl_loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        bbox_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        dfl_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        qfl_weight: float = 1.0,
        bbox_weight: float = 2.0,
        dfl_weight: float = 0.25,
        dfl_eps: float = 0.1,
        # inference
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        **kwargs,
    ) -> None:
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError(
                "backbone should contain an attribute out_channels "
                "specifying the number of output channels (assumed to be the "
                "same for all the levels)"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.anchor_strides = [int(s) for s in anchor_strides]

        if not isinstance(anchor_generator, (AnchorGenerator, type(None))):
            raise TypeError(
                f"anchor_generator should be of type AnchorGenerator or None, instead got {type(anchor_generator)}"
            )
        if anchor_generator is None:
            anchor_sizes = tuple((octave_base_scale * s,) for s in self.anchor_strides)
            anchor_generator = AnchorGenerator(anchor_sizes, ((1.0,),) * len(anchor_sizes))
        if any(n != 1 for n in anchor_generator.num_anchors_per_location()):
            raise ValueError(
                f"GFL uses one anchor per location; got {anchor_generator.num_anchors_per_location()} per level"
            )
        if len(anchor_generator.sizes) != len(self.anchor_strides):
            raise ValueError(
                f"anchor_generator has {len(anchor_generator.sizes)} levels but anchor_strides has "
                f"{len(self.anchor_strides)}"
            )
        self.anchor_generator = anchor_generator

        self.reg_max = reg_max
        if head is None:
            head = GFLHead(backbone.out_channels, num_classes, num_levels=len(self.anchor_strides), reg_max=reg_max)
        self.head = head

        self.assigner = assigner if assigner is not None else ATSSAssigner(topk=9)
        self.qfl_loss = qfl_loss if qfl_loss is not None else QualityFocalLoss(beta=2.0)
        self.bbox_loss = bbox_loss if bbox_loss is not None else GIoULoss()
        self.dfl_loss = dfl_loss if dfl_loss is not None else DistributionFocalLoss()
        self.qfl_weight = qfl_weight
        self.bbox_weight = bbox_weight
        self.dfl_weight = dfl_weight
        self.dfl_eps = dfl_eps

        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, **kwargs)

        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    # ------------------------------------------------------------------ anchors
    def feature_strides(self, images: ImageList, features: list[Tensor]) -> list[int]:
        """The nominal stride of each level, checked against the feature map sizes."""
        if len(features) != len(self.anchor_strides):
            raise ValueError(f"GFL expects {len(self.anchor_strides)} feature levels, got {len(features)}")
        height, width = images.tensors.shape[-2:]
        for level, (f, s) in enumerate(zip(features, self.anchor_strides)):
            expected = (math.ceil(height / s), math.ceil(width / s))
            if tuple(f.shape[-2:]) != expected:
                raise ValueError(
                    f"level {level}: a {height}x{width} input at stride {s} should give a {expected[0]}x{expected[1]}"
                    f" feature map, got {f.shape[-2]}x{f.shape[-1]}; check anchor_strides against the backbone"
                )
        return list(self.anchor_strides)

    def anchors(self, images: ImageList, features: list[Tensor]) -> tuple[list[Tensor], list[int]]:
        """Anchors of every image (``[A, 4]`` each, all levels, finest first) and the count per level."""
        strides = self.feature_strides(images, features)
        device = features[0].device
        grid_sizes = [list(f.shape[-2:]) for f in features]

        def build() -> tuple[Tensor, list[int]]:
            self.anchor_generator.set_cell_anchors(torch.float32, device)
            # torch.full, not torch.tensor: a host-to-device copy would wait for the device's queue
            stride_tensors = [[torch.full((), s, dtype=torch.int64, device=device)] * 2 for s in strides]
            per_level = self.anchor_generator.grid_anchors(grid_sizes, stride_tensors)
            return torch.cat(per_level, dim=0), [a.shape[0] for a in per_level]

        key = (tuple(map(tuple, grid_sizes)), tuple(strides), device)
        anchors, num_per_level = cached_anchors(self.anchor_generator, key, build)
        return [anchors for _ in images.image_sizes], list(num_per_level)

    def _anchor_strides(self, num_anchors_per_level: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        levels = per_level_values(range(len(num_anchors_per_level)), num_anchors_per_level, device, torch.int64)
        strides = per_level_values(self.anchor_strides, num_anchors_per_level, device, torch.float32)
        return levels, strides

    # ------------------------------------------------------------------ training
    def assign(
        self, targets: list[dict[str, Tensor]], anchors: list[Tensor], num_anchors_per_level: list[int]
    ) -> list[Tensor]:
        """``matched_idxs`` per image: box index, -1 background, -2 background inside an ignore box."""
        return list(self._assign_batch(targets, anchors, num_anchors_per_level).unbind(0))

    def _assign_batch(
        self, targets: list[dict[str, Tensor]], anchors: list[Tensor], num_anchors_per_level: list[int]
    ) -> Tensor:
        """:meth:`assign` as one ``Int64[B, A]`` tensor: batched over images when the assigner can
        (:meth:`ATSSAssigner.assign_batch`; the images of a batch share their anchors), per image otherwise."""
        if hasattr(self.assigner, "assign_batch") and all(a is anchors[0] for a in anchors):
            boxes, valid = pad_per_image([t["boxes"].to(anchors[0]) for t in targets])
            matched = self.assigner.assign_batch(anchors[0], num_anchors_per_level, boxes, valid)
            return ignore_background_batch(matched, anchors[0], targets)
        return torch.stack([
            ignore_background(self.assigner(a, num_anchors_per_level, t["boxes"]), a, ignore_boxes_of(t))
            for a, t in zip(anchors, targets)])

    def _positive_terms(
        self, cls_logits: Tensor, bbox_regression: Tensor, centres: Tensor, strides: Tensor, gt_boxes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """GIoU, DFL (mean of 4 sides), box weight and QFL quality target of (location, box) pairs, in stride units."""
        points = centres / strides[:, None]
        pred_boxes = distance2bbox(points, integral(bbox_regression, self.reg_max))
        target_boxes = gt_boxes / strides[:, None]
        quality = _aligned_iou(pred_boxes.detach(), target_boxes)
        weight = cls_logits.detach().sigmoid().amax(dim=1)
        bbox = self.bbox_loss(pred_boxes, target_boxes)
        target_dist = bbox2distance(points, target_boxes, self.reg_max, self.dfl_eps)
        dfl = self.dfl_loss(bbox_regression.reshape(-1, self.reg_max + 1), target_dist.reshape(-1))
        return bbox, dfl.reshape(-1, 4).mean(dim=1), weight, quality

    def compute_loss_terms(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
        matched_idxs: list[Tensor] | Tensor | None = None,
    ) -> GFLLossTerms:
        """Per-location losses; ``matched_idxs`` (per image [A], or stacked [B, A]) defaults to :meth:`assign`'s."""
        cls_logits = head_outputs["cls_logits"].float()  # [B, A, K]
        bbox_regression = head_outputs["bbox_regression"].float()  # [B, A, 4 * (reg_max + 1)]
        if matched_idxs is None:
            matched = self._assign_batch(targets, anchors, num_anchors_per_level)  # [B, A]
        else:
            matched = matched_idxs if isinstance(matched_idxs, Tensor) else torch.stack(matched_idxs)
        batch, num_locations = matched.shape
        pos = matched >= 0
        levels, strides = self._anchor_strides(num_anchors_per_level, cls_logits.device)

        # Every location's box and label from the padded targets (no loop over images, no boolean indexing).
        gt_boxes, _ = pad_per_image([t["boxes"] for t in targets])
        gt_labels, _ = pad_per_image([t["labels"] for t in targets])
        index = matched.clamp(min=0)
        gt_boxes_t = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4)).float()  # [B, A, 4]
        gt_labels_t = gt_labels.gather(1, index)

        anchors_t = torch.stack(anchors)
        # The positive terms of every location, the non-positives' then zeroed; their target is the anchor itself,
        # so that their (discarded) values and gradients stay finite.
        gt_boxes_t = torch.where(pos[..., None], gt_boxes_t, anchors_t)
        centres = (anchors_t[..., :2] + anchors_t[..., 2:]) / 2  # [B, A, 2]
        bbox, dfl, weight, quality = (
            torch.where(pos, v.view(batch, num_locations), 0.0)
            for v in self._positive_terms(cls_logits.flatten(0, 1), bbox_regression.flatten(0, 1),
                                          centres.flatten(0, 1), strides.repeat(batch), gt_boxes_t.flatten(0, 1)))
        labels_full = torch.where(pos, gt_labels_t, -1)
        qfl = self.qfl_loss(
            cls_logits.reshape(-1, cls_logits.shape[-1]), labels_full.reshape(-1), quality.reshape(-1)
        ).reshape(matched.shape)
        qfl = torch.where(matched == BETWEEN_THRESHOLDS, 0.0, qfl)
        return GFLLossTerms(matched_idxs=matched, levels=levels, qfl=qfl, bbox=bbox, dfl=dfl, weight=weight,
                            quality=quality)

    def reduce_loss_terms(self, terms: GFLLossTerms) -> dict[str, Tensor]:
        """The training loss: QFL / #positives; GIoU and DFL weighted by the score, / max(sum of weights, 1)."""
        return {k: v.sum() for k, v in self.level_loss_terms(terms).items()}

    def level_loss_terms(self, terms: GFLLossTerms, num_levels: int | None = None,
                         positives_only: bool = False) -> dict[str, Tensor]:
        """The training loss restricted to each level's locations (negatives included): ``{name: Tensor[L]}``
        whose sums over levels are :meth:`reduce_loss_terms` (MMDetection's per-level ``loss_single`` values).
        ``positives_only``: the negatives' QFL left out (GIoU and DFL are 0 off the positives anyway), normalised
        alike; what level AID uses in every family."""
        num_levels = num_levels or len(self.anchor_strides)
        pos = terms.matched_idxs >= 0
        num_pos = pos.sum().clamp(min=1)  # a tensor: no host sync
        weight_sum = terms.weight.sum().clamp(min=1.0)

        def per_level(values: Tensor) -> Tensor:
            return values.new_zeros(num_levels).index_add(0, terms.levels, values.sum(dim=0))

        qfl = torch.where(pos, terms.qfl, 0.0) if positives_only else terms.qfl
        return {
            "loss_qfl": self.qfl_weight * per_level(qfl) / num_pos,
            "loss_bbox": self.bbox_weight * per_level(terms.weight * terms.bbox) / weight_sum,
            "loss_dfl": self.dfl_weight * per_level(terms.weight * terms.dfl) / weight_sum,
        }

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
    ) -> dict[str, Tensor]:
        return self.reduce_loss_terms(self.compute_loss_terms(targets, head_outputs, anchors, num_anchors_per_level))

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        class_logits = head_outputs["cls_logits"]
        box_regression = head_outputs["bbox_regression"]
        detections: list[dict[str, Tensor]] = []
        for index, image_shape in enumerate(image_shapes):
            image_boxes, image_scores, image_labels = [], [], []
            for logits, regression, anchors_per_level, stride in zip(
                class_logits, box_regression, anchors[index], self.anchor_strides
            ):
                logits, regression = logits[index], regression[index]
                num_classes = logits.shape[-1]
                scores = torch.sigmoid(logits.float()).flatten()
                keep = scores > self.score_thresh
                scores = scores[keep]
                topk_idxs = torch.where(keep)[0]
                num_topk = det_utils._topk_min(topk_idxs, self.topk_candidates, 0)
                scores, idxs = scores.topk(num_topk)
                topk_idxs = topk_idxs[idxs]
                anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
                labels = topk_idxs % num_classes

                chosen = anchors_per_level[anchor_idxs]
                centres = (chosen[:, :2] + chosen[:, 2:]) / 2
                distances = integral(regression[anchor_idxs].float(), self.reg_max) * stride
                boxes = box_ops.clip_boxes_to_image(distance2bbox(centres, distances), image_shape)
                image_boxes.append(boxes)
                image_scores.append(scores)
                image_labels.append(labels)

            boxes = torch.cat(image_boxes, dim=0)
            scores = torch.cat(image_scores, dim=0)
            labels = torch.cat(image_labels, dim=0)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    def predict_from_features(self, images: ImageList, features: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in the pixels of ``images.tensors`` (before undoing the transform's resize)."""
        head_outputs = self.head(features)
        anchors, num_anchors_per_level = self.anchors(images, features)
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, images.image_sizes)

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """
        Args:
            images (list[Tensor]): images to be processed
            targets (list[Dict[Tensor]]): ground-truth boxes present in the image (optional)

        Returns:
            result (list[Dict[Tensor]] or dict[Tensor]): the losses in training, the detections in eval mode.
        """
        if self.training:
            if targets is None:
                raise ValueError("targets should not be none when in training mode")
            for target in targets:
                boxes = target["boxes"]
                if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(f"Expected target boxes to be a tensor of shape [N, 4], got {boxes!r:.80}.")

        original_image_sizes: list[tuple[int, int]] = []
        for img in images:
            if img.dim() != 3:
                raise ValueError(f"expected images of shape [C, H, W], got {tuple(img.shape)}")
            original_image_sizes.append((img.shape[-2], img.shape[-1]))

        # the transform resizes and normalises; prepare_inputs also rescales ``ignore_boxes`` like ``boxes``
        image_list, targets = prepare_inputs(self, images, targets)
        if targets is not None:
            check_targets(targets)
            labels = torch.cat([t["labels"] for t in targets])
            if labels.numel() and int(labels.max()) >= self.num_classes:  # model(images, targets) only: the
                # training loop's labels come from the dataset's classes
                raise ValueError(f"label {int(labels.max())} >= num_classes {self.num_classes}")

        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())

        if self.training:
            head_outputs = self.head(features)
            anchors, num_anchors_per_level = self.anchors(image_list, features)
            return self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
        detections = self.predict_from_features(image_list, features)
        return self.transform.postprocess(detections, image_list.image_sizes, original_image_sizes)


def _aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=eps)


def build_gfl(
    backbone: str,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    backbone_weights: str | None = None,
    trainable_backbone_layers: int = 3,
    frozen_bn: bool | None = None,
    **kwargs,
) -> GFL:
    """GFL on a ResNet / MobileNetV3 + FPN (P3-P7) backbone.

    ``frozen_bn`` defaults to torchvision's rule: frozen BatchNorm with pretrained backbone weights, trainable
    BatchNorm without. ``kwargs`` go to :class:`GFL`.
    """
    if frozen_bn is None:
        frozen_bn = backbone_weights is not None
    body = build_fpn_backbone(
        backbone,
        levels="p3p7",
        out_channels=fpn_channels,
        weights=backbone_weights,
        trainable_layers=trainable_backbone_layers,
        frozen_bn=frozen_bn,
    )
    return GFL(body, num_classes, min_size=min_size, max_size=max_size, **kwargs)
