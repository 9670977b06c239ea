"""Focal and Global Distillation (FGD; Yang et al., CVPR 2022).

Functional core:

- ``fgd_masks(boxes, height, width, stride)`` -> foreground scale mask and background mask (B, H, W);
- ``fgd_feature_loss(student, teacher, fg_mask, bg_mask, spatial, channel, pixel_weight=None)`` -> (fg, bg);
- ``fgd_attention_loss(student_spatial, student_channel, teacher_spatial, teacher_channel, image_weights=None)``;
- ``fgd_global_loss(student_out, teacher_out, image_weights=None)`` on the outputs of ``GlobalContextBlock``.

``FGDDistill`` wires them per FPN level (align conv when channel counts differ, a student and a teacher
``GlobalContextBlock`` per level). The spatial/channel attentions are those of ``attention.attention_masks``.

Differences from the published FGD code, on purpose: a box's footprint on a level is the set of cells whose centres
lie inside it (the rule AID's pixel maps use; a box covering no centre claims its centre cell), boxes are mapped to
cells with the level's stride, and rows/columns are indexed (y, x) (the published code indexes the mask (x, y)).
The foreground value of a cell is ``1 / (number of cells of the box's footprint)``, the largest such value where
boxes overlap (so the smallest box wins); background cells get ``1 / (number of background cells)``.

Reduction (``reduction=``): FGD's terms are batch means already, but sums over channels (feature, attention and
global terms) and over cells (attention and global terms), so they grow with the FPN width and the resolution. The
default ``"normalized"`` form multiplies each such sum by ``reference / actual`` (256 channels; ``reference_cells``
of the level at the 1333x800 input): equal to the published value at the reference setting, invariant to width and
resolution. ``"published"`` keeps the FGD code's sums. AID weights multiply squared (attention: absolute) errors, so
they enter linearly (``aidkd.distill.base``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .attention import attention_masks
from .base import (
    REFERENCE_CHANNELS,
    DistillInputs,
    DistillMethod,
    Reduction,
    box_cell_membership,
    check_reduction,
    make_adapter,
    reference_cells,
    weighted_batch_mean,
)


def fgd_masks(boxes: Sequence[Tensor], height: int, width: int, stride: float) -> tuple[Tensor, Tensor]:
    """Foreground scale mask and background mask of one level, each (B, H, W) float32.

    fg[b, y, x] = max over boxes k of image b covering the cell of 1 / |footprint_k| (0 outside all boxes), so each
    isolated box's footprint sums to 1; bg[b] = 1 / (number of cells outside all boxes) on those cells, 0 elsewhere
    (all zeros if boxes cover the whole map).
    """
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    fg = torch.zeros((len(boxes), height, width), dtype=torch.float32, device=device)
    for b, image_boxes in enumerate(boxes):
        member = box_cell_membership(image_boxes, height, width, stride)  # (N, H, W)
        if member.shape[0]:
            counts = member.flatten(1).sum(dim=1).clamp(min=1).to(torch.float32)  # (N,)
            fg[b] = (member.to(torch.float32) / counts[:, None, None]).amax(dim=0)
    background = (fg == 0).to(torch.float32)
    bg = background / background.flatten(1).sum(dim=1).clamp(min=1)[:, None, None]
    return fg, bg


def fgd_feature_loss(
    student: Tensor,
    teacher: Tensor,
    fg_mask: Tensor,
    bg_mask: Tensor,
    spatial: Tensor,
    channel: Tensor,
    pixel_weight: Tensor | None = None,
    *,
    reduction: Reduction = "normalized",
) -> tuple[Tensor, Tensor]:
    """Focal feature loss: (fg, bg), each ``sum (teacher - student)**2 * spatial * channel * mask / B``
    (``"published"``), times ``256 / C`` for the default ``"normalized"`` form (the channel mask sums to C).

    ``student`` is aligned to the teacher's channels; ``spatial`` (B, H, W) and ``channel`` (B, C) are the teacher's
    attention masks (detached here, like the teacher). ``pixel_weight`` (B, H, W) (AID) multiplies the squared error
    of both masks' pixels (it is 1 on background for instance-level AID, so in practice it weights the foreground);
    all ones give the unweighted loss.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"fgd_feature_loss: student {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    check_reduction(reduction, "fgd_feature_loss")
    b, c, h, w = teacher.shape
    for what, mask in (("fg_mask", fg_mask), ("bg_mask", bg_mask), ("spatial", spatial)):
        if tuple(mask.shape) != (b, h, w):
            raise ValueError(f"fgd_feature_loss: {what} {tuple(mask.shape)} != {(b, h, w)}")
    squared = (teacher.detach() - student).pow(2) * channel.detach()[:, :, None, None]
    squared = squared.sum(dim=1) * spatial.detach()  # (B, H, W)
    if pixel_weight is not None:
        if tuple(pixel_weight.shape) != (b, h, w):
            raise ValueError(f"fgd_feature_loss: pixel_weight {tuple(pixel_weight.shape)} != {(b, h, w)}")
        squared = squared * pixel_weight.detach().to(device=squared.device, dtype=squared.dtype)
    if reduction == "normalized":
        squared = squared * (REFERENCE_CHANNELS / c)
    fg_loss = (squared * fg_mask.to(device=squared.device, dtype=squared.dtype)).sum() / b
    bg_loss = (squared * bg_mask.to(device=squared.device, dtype=squared.dtype)).sum() / b
    return fg_loss, bg_loss


def fgd_attention_loss(
    student_spatial: Tensor,
    student_channel: Tensor,
    teacher_spatial: Tensor,
    teacher_channel: Tensor,
    image_weights: Tensor | None = None,
    *,
    reduction: Reduction = "normalized",
    stride: float = 8,
    location_weights: Tensor | None = None,
) -> Tensor:
    """Attention loss: ``sum_b w_b * (sum |C_t - C_s| + sum |S_t - S_s|) / B`` (``"published"``); the default
    ``"normalized"`` form scales the channel sum by ``256 / C`` and the spatial sum by ``reference_cells(stride) /
    (H*W)``. ``location_weights`` (B, H, W) weight each location of the spatial term instead of ``w_b`` (AID
    ``global_terms: pixel``; the channel term keeps the image weights). The teacher side is detached."""
    if student_spatial.shape != teacher_spatial.shape or student_channel.shape != teacher_channel.shape:
        raise ValueError("fgd_attention_loss: student and teacher attention shapes differ: "
                         f"{tuple(student_spatial.shape)}/{tuple(teacher_spatial.shape)}, "
                         f"{tuple(student_channel.shape)}/{tuple(teacher_channel.shape)}")
    check_reduction(reduction, "fgd_attention_loss")
    channel_sum = (teacher_channel.detach() - student_channel).abs().flatten(1).sum(dim=1)
    spatial = (teacher_spatial.detach() - student_spatial).abs()
    if location_weights is not None:
        spatial = spatial * _fit_location_weights(location_weights, spatial, "fgd_attention_loss")
    spatial_sum = spatial.flatten(1).sum(dim=1)
    if reduction == "normalized":
        channel_sum = channel_sum * (REFERENCE_CHANNELS / teacher_channel.shape[1])
        spatial_sum = spatial_sum * (reference_cells(stride) / teacher_spatial[0].numel())
    if location_weights is None:
        return weighted_batch_mean(channel_sum + spatial_sum, image_weights)
    return weighted_batch_mean(channel_sum, image_weights) + weighted_batch_mean(spatial_sum)


def _fit_location_weights(location_weights: Tensor, per_location: Tensor, where: str) -> Tensor:
    """``location_weights`` (B, H, W), detached, in ``per_location``'s dtype and device; checked against its shape."""
    if tuple(location_weights.shape) != tuple(per_location.shape):
        raise ValueError(f"{where}: location_weights {tuple(location_weights.shape)} != {tuple(per_location.shape)}")
    return location_weights.detach().to(device=per_location.device, dtype=per_location.dtype)


class GlobalContextBlock(nn.Module):
    """GcBlock-like global context: ``x + T(sum_hw softmax(conv_mask(x)) * x)``, T = 1x1 conv C -> C/2, LayerNorm,
    ReLU, 1x1 conv C/2 -> C (last conv zero-initialised, so the block is the identity at initialisation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        weights = self.conv_mask(x).reshape(b, 1, h * w).softmax(dim=2)  # (B, 1, HW)
        context = torch.bmm(x.reshape(b, c, h * w), weights.transpose(1, 2)).reshape(b, c, 1, 1)
        return x + self.transform(context)


def fgd_global_loss(student_out: Tensor, teacher_out: Tensor, image_weights: Tensor | None = None, *,
                    reduction: Reduction = "normalized", stride: float = 8,
                    location_weights: Tensor | None = None) -> Tensor:
    """Global relation loss: ``sum_b w_b * sum (teacher_out - student_out)**2 / B`` (``"published"``); the default
    ``"normalized"`` form scales the sum by ``256 * reference_cells(stride) / (C*H*W)``. ``location_weights``
    (B, H, W) weight each location's squared residual instead of ``w_b`` (AID ``global_terms: pixel``).

    Inputs are ``GlobalContextBlock`` outputs. The teacher side is not detached: as in the published code, the
    teacher's context block is trained through this loss (the teacher features themselves arrive detached).
    """
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"fgd_global_loss: student {tuple(student_out.shape)} != teacher {tuple(teacher_out.shape)}")
    check_reduction(reduction, "fgd_global_loss")
    squared = (teacher_out - student_out).pow(2)
    if location_weights is not None:
        squared = squared.sum(dim=1) * _fit_location_weights(location_weights, squared[:, 0], "fgd_global_loss")
        image_weights = None
    per_image = squared.flatten(1).sum(dim=1)
    if reduction == "normalized":
        per_image = per_image * (REFERENCE_CHANNELS * reference_cells(stride) / student_out[0].numel())
    return weighted_batch_mean(per_image, image_weights)


class FGDDistill(DistillMethod):
    """FGD per FPN level: ``{"fg", "bg", "attention", "global"}``, each weighted and summed over levels.

    Parameters (defaults: the published FGD code's, two-stage Faster R-CNN)
        temperature: T of the attention masks (0.5).
        alpha_fgd: weight of the foreground feature loss (1e-3).
        beta_fgd: weight of the background feature loss (5e-4).
        gamma_fgd: weight of the attention loss (1e-3).
        lambda_fgd: weight of the global relation loss (5e-6).
        reduction: ``"normalized"`` (default) or ``"published"`` (module docstring).

    Owns per level an align 1x1 conv (only when the channel counts differ, as the published code), a student and a
    teacher ``GlobalContextBlock``. Needs ``inputs.boxes``. AID: ``pixel_weights`` weight the fg/bg feature losses,
    ``image_weights`` the attention and global losses (``location_weights``, when given, the spatial attention and
    the global losses), ``level_weights`` all four.
    """

    name = "fgd"
    uses_boxes = True

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        *,
        temperature: float = 0.5,
        alpha_fgd: float = 1e-3,
        beta_fgd: float = 5e-4,
        gamma_fgd: float = 1e-3,
        lambda_fgd: float = 5e-6,
        reduction: Reduction = "normalized",
    ) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        check_reduction(reduction, "fgd")
        self.reduction = reduction
        if temperature <= 0:
            raise ValueError(f"fgd: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.alpha_fgd = float(alpha_fgd)
        self.beta_fgd = float(beta_fgd)
        self.gamma_fgd = float(gamma_fgd)
        self.lambda_fgd = float(lambda_fgd)
        self.aligns = nn.ModuleList(
            make_adapter(student_channels, teacher_channels) if student_channels != teacher_channels
            else nn.Identity()
            for _ in range(num_levels))
        self.student_context = nn.ModuleList(GlobalContextBlock(teacher_channels) for _ in range(num_levels))
        self.teacher_context = nn.ModuleList(GlobalContextBlock(teacher_channels) for _ in range(num_levels))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", temperature={self.temperature}, alpha_fgd={self.alpha_fgd}, "
                f"beta_fgd={self.beta_fgd}, gamma_fgd={self.gamma_fgd}, lambda_fgd={self.lambda_fgd}, "
                f"reduction={self.reduction!r}")

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        self.check(inputs)
        totals: dict[str, Tensor | float] = {"fg": 0.0, "bg": 0.0, "attention": 0.0, "global": 0.0}
        for level, (student, teacher) in enumerate(zip(inputs.student, inputs.teacher)):
            teacher = teacher.detach()
            student = self.aligns[level](student)
            _, _, h, w = teacher.shape
            fg_mask, bg_mask = fgd_masks([bx.to(teacher.device) for bx in inputs.boxes], h, w,
                                         inputs.strides[level])
            t_spatial, t_channel = attention_masks(teacher, self.temperature)
            s_spatial, s_channel = attention_masks(student, self.temperature)
            stride = inputs.strides[level]
            fg, bg = fgd_feature_loss(student, teacher, fg_mask, bg_mask, t_spatial, t_channel,
                                      self._pixel_weight(inputs, level), reduction=self.reduction)
            location = self._location_weight(inputs, level)
            attention = fgd_attention_loss(s_spatial, s_channel, t_spatial, t_channel, inputs.image_weights,
                                           reduction=self.reduction, stride=stride, location_weights=location)
            global_ = fgd_global_loss(self.student_context[level](student), self.teacher_context[level](teacher),
                                      inputs.image_weights, reduction=self.reduction, stride=stride,
                                      location_weights=location)
            level_weight = self._level_weight(inputs, level)
            for key, value in (("fg", fg), ("bg", bg), ("attention", attention), ("global", global_)):
                totals[key] = totals[key] + level_weight * value
        return {
            "fg": self.alpha_fgd * totals["fg"],
            "bg": self.beta_fgd * totals["bg"],
            "attention": self.gamma_fgd * totals["attention"],
            "global": self.lambda_fgd * totals["global"],
        }
