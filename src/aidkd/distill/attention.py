"""Attention-guided distillation (Zhang & Ma, ICLR 2021): attention-masked feature loss + attention transfer.

Functional core (tensors in, loss out), usable without the module:

- ``attention_masks(feat, temperature)`` -> spatial (B, H, W) and channel (B, C) masks;
- ``masked_feature_loss(student, teacher, spatial, channel, pixel_weight=None)`` -> L_AM;
- ``attention_transfer_loss(student, teacher, form=..., ...)`` -> L_AT (channel term + spatial term).

``AttentionDistill`` wires them up per FPN level with a 1x1 adapter per level (student -> teacher channels) and, for
the published code's form of L_AT, the small learnable adapters a_c (linear) and a_s (3x3 conv, 1 -> 1 channel).

Default weights are the AID paper code's two-stage values (T = 0.5, L_AM 4e-5, L_AT 8e-3 per term); Zhang & Ma's
two-stage values are 7e-5 / 4e-3, the one-stage (GFL) ones T = 0.1, 5.6e-4 / 2.4e-2 (see docs/method notes).

Reduction (``reduction=``, see ``aidkd.distill.base``): the published code's L_AM and L_AT are square roots of sums
over the whole batch, so they grow with sqrt(batch), sqrt(H*W) (L_AM, spatial L_AT) and sqrt(C) (L_AM, channel L_AT).
The default ``"normalized"`` form is ``published * sqrt(reference_elements / elements)``: invariant to batch size,
resolution and width, and equal to the published value at 2 images per device, 256 channels and a 1333x800 input,
so the published weights are the defaults. ``"published"`` keeps the authors' form exactly.
"""
from __future__ import annotations

from typing import Literal

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
    root_sum_squares,
    weighted_norm,
)

ATForm = Literal["paper", "code"]
MaskSource = Literal["mean", "teacher"]


def attention_masks(feat: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial and channel attention masks of features (B, C, H, W).

    spatial = H*W * softmax over H*W of (mean over channels of |feat|) / T   -> (B, H, W), sums to H*W per image;
    channel = C * softmax over C of (mean over H, W of |feat|) / T           -> (B, C), sums to C per image.
    Not detached: callers that use them as weights detach them (``masked_feature_loss`` does).
    """
    if feat.dim() != 4:
        raise ValueError(f"attention_masks expects (B, C, H, W), got {tuple(feat.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, c, h, w = feat.shape
    value = feat.abs()
    spatial = value.mean(dim=1).reshape(b, h * w)
    spatial = (h * w) * F.softmax(spatial / temperature, dim=1)
    channel = value.mean(dim=(2, 3))
    channel = c * F.softmax(channel / temperature, dim=1)
    return spatial.reshape(b, h, w), channel


def masked_feature_loss(
    student: Tensor,
    teacher: Tensor,
    spatial: Tensor,
    channel: Tensor,
    pixel_weight: Tensor | None = None,
    *,
    reduction: Reduction = "normalized",
    stride: float = 8,
) -> Tensor:
    """Attention-masked feature loss L_AM of one level.

    ``"published"``: ``sqrt( sum_{b,c,h,w} (teacher - student)**2 * spatial[b,h,w] * channel[b,c] *
    pixel_weight[b,h,w] )`` over the whole batch, as the reference code (no normalisation by B, H, W or C).
    ``"normalized"`` (default): the same sum divided by ``B*C*H*W`` and multiplied by ``2 * 256 *
    reference_cells(stride)`` (its element count at the reference setting) before the square root: the published
    value at 2 images, 256 channels, 1333x800, and unchanged by repeating the batch, upsampling the maps or repeating
    channels. ``stride`` is the level's stride in input pixels (it only sets the reference cell count).

    ``student`` is already adapted to the teacher's channels. The teacher and the masks are targets: they are
    detached here, so the gradient reaches only the student side. ``pixel_weight`` (B, H, W) (AID) multiplies each
    pixel's squared error, so a pixel of weight ``w`` gets ``w`` times the gradient of an equal pixel of weight 1;
    ``None`` or all ones give the unweighted loss.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"masked_feature_loss: student {tuple(student.shape)} != teacher {tuple(teacher.shape)}"
                         " (adapt the student to the teacher's channels first)")
    b, c, h, w = teacher.shape
    if tuple(spatial.shape) != (b, h, w) or tuple(channel.shape) != (b, c):
        raise ValueError(f"masked_feature_loss: masks {tuple(spatial.shape)}, {tuple(channel.shape)} do not fit "
                         f"features {tuple(teacher.shape)}")
    check_reduction(reduction, "masked_feature_loss")
    scale = spatial.detach().sqrt()[:, None, :, :] * channel.detach().sqrt()[:, :, None, None]
    residual = (teacher.detach() - student) * scale
    weights = None
    if pixel_weight is not None:
        if tuple(pixel_weight.shape) != (b, h, w):
            raise ValueError(f"masked_feature_loss: pixel_weight {tuple(pixel_weight.shape)} != {(b, h, w)}")
        weights = pixel_weight[:, None, :, :]
    return root_sum_squares(residual, weights, reduction=reduction,
                            reference_elements=REFERENCE_BATCH * REFERENCE_CHANNELS * reference_cells(stride))


def attention_transfer_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    form: ATForm = "paper",
    channel_adapter: nn.Module | None = None,
    spatial_adapter: nn.Module | None = None,
    image_weights: Tensor | None = None,
    reduction: Reduction = "normalized",
    stride: float = 8,
    location_weights: Tensor | None = None,
) -> Tensor:
    """Attention-transfer loss L_AT of one level: channel term + spatial term, each an L2 norm over the batch.

    ``form="paper"``: attentions are means of |F| (channel: over H, W; spatial: over C), no learnable parts;
    ``student`` must then have the teacher's channel count (pass the adapted student if the counts differ).
    ``form="code"`` (the published code): *signed* means, the student's channel attention goes through
    ``channel_adapter`` (a ``nn.Linear(C_s, C_t)``; identity if ``None`` and C_s == C_t) and its spatial attention
    (B, 1, H, W) through ``spatial_adapter`` (a 3x3 ``nn.Conv2d(1, 1)``; identity if ``None``).

    ``image_weights`` (B,) multiply each image's squared residual (``base.weighted_norm``): all ones give the
    unweighted loss exactly; an image of weight ``w`` gets ``w`` times the gradient of one of weight 1.
    ``location_weights`` (B, H, W) weight the spatial term's residual per location instead (AID ``global_terms:
    pixel``; the channel term has no location and keeps ``image_weights``).
    ``reduction``: ``"published"`` (each term the L2 norm over the whole batch, as the code) or ``"normalized"``
    (default; each term ``published * sqrt(reference / elements)`` with reference ``2 * 256`` for the channel term,
    ``2 * reference_cells(stride)`` for the spatial term; see ``masked_feature_loss``). The teacher is detached.
    """
    teacher = teacher.detach()
    check_reduction(reduction, "attention_transfer_loss")
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"attention_transfer_loss: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must be (B, C, H, W) with equal B, H, W")
    if form == "paper":
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"attention_transfer_loss(form='paper'): student has {student.shape[1]} channels, "
                             f"teacher {teacher.shape[1]}; pass the adapted student")
        s_abs, t_abs = student.abs(), teacher.abs()
        s_channel, t_channel = s_abs.mean(dim=(2, 3)), t_abs.mean(dim=(2, 3))
        s_spatial, t_spatial = s_abs.mean(dim=1), t_abs.mean(dim=1)
    elif form == "code":
        s_channel = student.mean(dim=(2, 3))
        if channel_adapter is not None:
            s_channel = channel_adapter(s_channel)
        t_channel = teacher.mean(dim=(2, 3))
        if s_channel.shape != t_channel.shape:
            raise ValueError(f"attention_transfer_loss(form='code'): student channel attention "
                             f"{tuple(s_channel.shape)} != teacher {tuple(t_channel.shape)}; give a channel_adapter")
        s_spatial = student.mean(dim=1, keepdim=True)
        if spatial_adapter is not None:
            s_spatial = spatial_adapter(s_spatial)
        s_spatial = s_spatial[:, 0]
        t_spatial = teacher.mean(dim=1)
    else:
        raise ValueError(f"unknown attention-transfer form {form!r}; expected 'paper' or 'code'")
    channel_term = weighted_norm(t_channel - s_channel, image_weights, reduction=reduction,
                                 reference_elements=REFERENCE_BATCH * REFERENCE_CHANNELS)
    spatial_term = weighted_norm(t_spatial - s_spatial, image_weights, reduction=reduction,
                                 reference_elements=REFERENCE_BATCH * reference_cells(stride),
                                 location_weights=location_weights)
    return channel_term + spatial_term


class AttentionDistill(DistillMethod):
    """Attention-guided distillation per FPN level: ``{"am": am_weight * sum_l L_AM, "at": at_weight * sum_l L_AT}``.

    Parameters
        temperature: T of the attention masks (0.5 two-stage, 0.1 one-stage in the published configs).
        am_weight: weight of the attention-masked feature loss (AID two-stage code: 4e-5).
        at_weight: weight of *each* of the two attention-transfer terms (AID two-stage code: 8e-3).
        at_form: ``"paper"`` (|F| means, no learnable parts; default) or ``"code"`` (signed means, learnable a_c
            linear C_s -> C_t and a_s 3x3 conv 1 -> 1 per level, as the published code).
        mask_source: ``"mean"`` (average of the teacher's and the student's masks, detached; the reference code) or
            ``"teacher"`` (the teacher's masks only).
        reduction: ``"normalized"`` (default: invariant to batch size, resolution and width, equal to the published
            value at the reference setting) or ``"published"`` (the authors' sqrt of the batch sum); module docstring.

    The student-side attention (for ``mask_source="mean"`` and ``at_form="paper"``) is computed on the raw student
    features when the channel counts match, and on the adapted student features otherwise. AID: ``pixel_weights``
    weight L_AM, ``image_weights`` weight L_AT (``location_weights``, when given, its spatial term),
    ``level_weights`` weight both (see ``aidkd.distill.base``).
    """

    name = "attention"

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        *,
        temperature: float = 0.5,
        am_weight: float = 4e-5,
        at_weight: float = 8e-3,
        at_form: ATForm = "paper",
        mask_source: MaskSource = "mean",
        reduction: Reduction = "normalized",
    ) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        check_reduction(reduction, "attention")
        if temperature <= 0:
            raise ValueError(f"attention: temperature must be > 0, got {temperature}")
        if at_form not in ("paper", "code"):
            raise ValueError(f"attention: at_form must be 'paper' or 'code', got {at_form!r}")
        if mask_source not in ("mean", "teacher"):
            raise ValueError(f"attention: mask_source must be 'mean' or 'teacher', got {mask_source!r}")
        self.temperature = float(temperature)
        self.am_weight = float(am_weight)
        self.at_weight = float(at_weight)
        self.at_form = at_form
        self.mask_source = mask_source
        self.reduction = reduction
        self.adapters = nn.ModuleList(make_adapter(student_channels, teacher_channels) for _ in range(num_levels))
        if at_form == "code":
            self.channel_adapters = nn.ModuleList(
                nn.Linear(student_channels, teacher_channels) for _ in range(num_levels))
            self.spatial_adapters = nn.ModuleList(
                nn.Conv2d(1, 1, kernel_size=3, stride=1, padding=1) for _ in range(num_levels))
        else:
            self.channel_adapters = None
            self.spatial_adapters = None

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", temperature={self.temperature}, am_weight={self.am_weight}, "
                f"at_weight={self.at_weight}, at_form={self.at_form!r}, mask_source={self.mask_source!r}, "
                f"reduction={self.reduction!r}")

    def _student_for_attention(self, raw: Tensor, adapted: Tensor) -> Tensor:
        return raw if self.student_channels == self.teacher_channels else adapted

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        self.check(inputs)
        am_total: Tensor | float = 0.0
        at_total: Tensor | float = 0.0
        for level, (student, teacher) in enumerate(zip(inputs.student, inputs.teacher)):
            teacher = teacher.detach()
            adapted = self.adapters[level](student)
            spatial, channel = attention_masks(teacher, self.temperature)
            if self.mask_source == "mean":
                s_spatial, s_channel = attention_masks(self._student_for_attention(student, adapted).detach(),
                                                       self.temperature)
                spatial, channel = (spatial + s_spatial) / 2, (channel + s_channel) / 2
            stride = inputs.strides[level]
            am = masked_feature_loss(adapted, teacher, spatial.detach(), channel.detach(),
                                     self._pixel_weight(inputs, level), reduction=self.reduction, stride=stride)
            if self.at_form == "code":
                assert self.channel_adapters is not None and self.spatial_adapters is not None
                at = attention_transfer_loss(student, teacher, form="code",
                                             channel_adapter=self.channel_adapters[level],
                                             spatial_adapter=self.spatial_adapters[level],
                                             image_weights=inputs.image_weights, reduction=self.reduction,
                                             stride=stride, location_weights=self._location_weight(inputs, level))
            else:
                at = attention_transfer_loss(self._student_for_attention(student, adapted), teacher, form="paper",
                                             image_weights=inputs.image_weights, reduction=self.reduction,
                                             stride=stride, location_weights=self._location_weight(inputs, level))
            level_weight = self._level_weight(inputs, level)
            am_total = am_total + level_weight * am
            at_total = at_total + level_weight * at
        return {"am": self.am_weight * am_total, "at": self.at_weight * at_total}
