"""Non-local distillation (Zhang & Ma, ICLR 2021): match the relations a non-local block finds in each feature map.

Functional core: ``nonlocal_loss(student_relation, teacher_relation, image_weights=None)``; building block:
``NonLocalBlock2d``; module: ``NonLocalDistill``.

Teacher-side block: frozen by default (``train_teacher_block=False``): it keeps its initial parameters, and since its
output BatchNorm is zero-initialised it is the identity, so the loss is ``|| a(NL_S(F^S)) - F^T ||_2``. The reference
code trains the teacher's block through this loss (``train_teacher_block=True``; the teacher's *features* stay frozen
either way), which lets the loss shrink by moving the target. Ablation (benchmarks/results/strength_cpu: GFL, 3 seeds,
small generated set): frozen - trainable +0.15 +- 0.17 COCO AP (3/3 seeds), +0.7 +- 1.6 AP50 (1/3): a small edge
inside the seed spread, on one family; frozen is also cheaper. The paper configs (``configs/kitti_*``, ``coco_traffic_*``) keep the published choice.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    REFERENCE_BATCH,
    REFERENCE_CHANNELS,
    DistillInputs,
    DistillMethod,
    Reduction,
    check_reduction,
    make_adapter,
    reference_cells,
    weighted_norm,
)


class NonLocalBlock2d(nn.Module):
    """Embedded-dot-product non-local block (Wang et al. 2018) with max-pooled keys/values.

    theta, phi, g: 1x1 convs ``channels -> inter_channels``; phi and g are max-pooled with ``pool_stride`` (clamped
    to the map size, ``ceil_mode`` so no border row/column is dropped, so tiny maps still give >= 1 key);
    ``y = (theta^T phi / N) g`` with N the number of pooled positions; ``z = W(y) + x`` with ``W`` a 1x1 conv
    ``inter_channels -> channels`` followed by BatchNorm whose weight and bias start at zero: the block is the
    identity at initialisation.

    BatchNorm in training mode needs more than one value per channel; for a batch with a single 1x1 map it uses its
    running statistics instead of failing.
    """

    def __init__(self, channels: int, inter_channels: int, pool_stride: int = 1) -> None:
        super().__init__()
        if channels < 1 or inter_channels < 1 or pool_stride < 1:
            raise ValueError(f"NonLocalBlock2d: channels={channels}, inter_channels={inter_channels}, "
                             f"pool_stride={pool_stride} must all be >= 1")
        self.channels = channels
        self.inter_channels = inter_channels
        self.pool_stride = pool_stride
        self.theta = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.g = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.out_conv = nn.Conv2d(inter_channels, channels, kernel_size=1)
        self.out_norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.out_norm.weight)
        nn.init.zeros_(self.out_norm.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inter_channels={self.inter_channels}, pool_stride={self.pool_stride}"

    def _pool(self, x: Tensor) -> Tensor:
        k = max(1, min(self.pool_stride, x.shape[-2], x.shape[-1]))
        if k == 1:
            return x
        return F.max_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, I)
        phi = self._pool(self.phi(x)).flatten(2)  # (B, I, N)
        g = self._pool(self.g(x)).flatten(2).transpose(1, 2)  # (B, N, I)
        relation = torch.bmm(theta, phi) / phi.shape[-1]  # (B, HW, N)
        y = torch.bmm(relation, g).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        y = self.out_conv(y)
        if self.training and b * h * w == 1:
            y = F.batch_norm(y, self.out_norm.running_mean, self.out_norm.running_var, self.out_norm.weight,
                             self.out_norm.bias, training=False, eps=self.out_norm.eps)
        else:
            y = self.out_norm(y)
        return y + x


def nonlocal_loss(student_relation: Tensor, teacher_relation: Tensor, image_weights: Tensor | None = None, *,
                  reduction: Reduction = "normalized", stride: float = 8,
                  location_weights: Tensor | None = None) -> Tensor:
    """L_NL of one level: ``|| student_relation - teacher_relation ||_2`` over the whole batch (``"published"``), or
    by default its ``"normalized"`` form ``published * sqrt(2 * 256 * reference_cells(stride) / (B*C*H*W))``
    (invariant to batch size, resolution and width; the published value at the reference setting, see
    ``aidkd.distill.base``).

    ``student_relation`` is ``a(NL_S(F^S))`` (adapted to the teacher's channels), ``teacher_relation`` is
    ``NL_T(F^T)``. The teacher side is *not* detached here: the teacher's non-local block may be trained through
    this loss (the reference code does); detach it yourself if it should not be. ``image_weights`` (B,) multiply
    each image's squared residual (``base.weighted_norm``): all ones give the unweighted loss exactly, an image of
    weight ``w`` gets ``w`` times the gradient of one of weight 1. ``location_weights`` (B, H, W) weight each
    location's squared residual (over all channels) instead (AID ``global_terms: pixel``).
    """
    if student_relation.shape != teacher_relation.shape:
        raise ValueError(f"nonlocal_loss: student {tuple(student_relation.shape)} != teacher "
                         f"{tuple(teacher_relation.shape)}")
    check_reduction(reduction, "nonlocal_loss")
    return weighted_norm(teacher_relation - student_relation, image_weights, reduction=reduction,
                         reference_elements=REFERENCE_BATCH * REFERENCE_CHANNELS * reference_cells(stride),
                         location_weights=location_weights)


def default_nonlocal_plan(num_levels: int, channels: int) -> tuple[list[int], list[int]]:
    """Per-level (inter_channels, pool_stride) of the reference code: (64, 8) and (64, 4) on the two finest levels,
    (128, 2) elsewhere; inter-channels are capped at ``max(1, channels // 2)`` for narrow (small-model) FPNs."""
    inter = [64 if i < 2 else 128 for i in range(num_levels)]
    stride = [8 if i == 0 else 4 if i == 1 else 2 for i in range(num_levels)]
    cap = max(1, channels // 2)
    return [min(c, cap) for c in inter], stride


class NonLocalDistill(DistillMethod):
    """Non-local distillation per FPN level: ``{"nl": nl_weight * sum_l L_NL}``.

    Parameters
        nl_weight: weight of L_NL (AID two-stage code: 4e-5; Zhang & Ma two-stage 7e-5; one-stage AID 4.9e-4).
        inter_channels: per-level inter-channels of both non-local blocks; ``None`` = ``default_nonlocal_plan``.
        pool_strides: per-level max-pool stride on phi and g; ``None`` = ``default_nonlocal_plan``.
        train_teacher_block: whether the teacher-side non-local block is trained through this loss (default False;
            the reference code: True). See the module docstring.
        reduction: ``"normalized"`` (default) or ``"published"`` (``nonlocal_loss``).

    Owns per level a student block (C_s), a teacher block (C_t) and a 1x1 adapter C_s -> C_t applied after the
    student block. AID: ``image_weights`` (or, when given, ``location_weights``) and ``level_weights`` apply (L_NL
    is a global term with a per-location residual).
    """

    name = "nonlocal"

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        *,
        nl_weight: float = 4e-5,
        inter_channels: Sequence[int] | None = None,
        pool_strides: Sequence[int] | None = None,
        train_teacher_block: bool = False,
        reduction: Reduction = "normalized",
    ) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        check_reduction(reduction, "nonlocal")
        self.reduction = reduction
        s_inter, default_strides = default_nonlocal_plan(num_levels, student_channels)
        t_inter, _ = default_nonlocal_plan(num_levels, teacher_channels)
        if inter_channels is not None:
            if len(inter_channels) != num_levels:
                raise ValueError(f"nonlocal: inter_channels has {len(inter_channels)} entries for {num_levels} "
                                 "levels")
            s_inter = t_inter = [int(c) for c in inter_channels]
        if pool_strides is not None:
            if len(pool_strides) != num_levels:
                raise ValueError(f"nonlocal: pool_strides has {len(pool_strides)} entries for {num_levels} levels")
            default_strides = [int(s) for s in pool_strides]
        self.nl_weight = float(nl_weight)
        self.train_teacher_block = bool(train_teacher_block)
        self.student_blocks = nn.ModuleList(
            NonLocalBlock2d(student_channels, s_inter[i], default_strides[i]) for i in range(num_levels))
        self.teacher_blocks = nn.ModuleList(
            NonLocalBlock2d(teacher_channels, t_inter[i], default_strides[i]) for i in range(num_levels))
        self.adapters = nn.ModuleList(make_adapter(student_channels, teacher_channels) for _ in range(num_levels))
        if not self.train_teacher_block:
            self.teacher_blocks.requires_grad_(False)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", nl_weight={self.nl_weight}, train_teacher_block={self.train_teacher_block}"
                f", reduction={self.reduction!r}")

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        self.check(inputs)
        total: Tensor | float = 0.0
        for level, (student, teacher) in enumerate(zip(inputs.student, inputs.teacher)):
            student_relation = self.adapters[level](self.student_blocks[level](student))
            teacher_relation = self.teacher_blocks[level](teacher.detach())
            if not self.train_teacher_block:
                teacher_relation = teacher_relation.detach()
            loss = nonlocal_loss(student_relation, teacher_relation, inputs.image_weights, reduction=self.reduction,
                                 stride=inputs.strides[level], location_weights=self._location_weight(inputs, level))
            total = total + self._level_weight(inputs, level) * loss
        return {"nl": self.nl_weight * total}
