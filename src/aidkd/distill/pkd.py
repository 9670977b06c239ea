"""PKD: distillation by Pearson correlation of FPN features (Cao et al., "PKD: General Distillation Framework for
Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022).

Each feature channel is normalised to zero mean and unit variance, then student and teacher are compared by MSE
(halved, as in MMRazor's ``PKDLoss``, so that the unweighted loss of one channel is ``1 - r``, r the Pearson
correlation of the student's and the teacher's channel). The normalisation makes it insensitive to the scale of the
features: a student whose FPN is 10x weaker than the teacher's, or a teacher from another architecture, needs no
rescaling, which is why it is the strongest generic method in MMRazor.

Differences from MMRazor's ``PKDLoss``, on purpose: statistics are taken per image and channel over H, W (MMRazor:
per channel over the whole batch, N*H*W), so an image's loss does not depend on the other images of the batch (batch
repetition leaves loss and gradient unchanged), and the variance is the population one with ``eps`` inside the square
root. Channel counts that differ go through a 1x1 adapter (MMRazor expects equal widths). A mean over every element:
invariant to batch size, resolution and width, with no ``reduction`` option.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import DistillInputs, DistillMethod, make_adapter

EPS = 1e-6


def channel_standardise(feat: Tensor, eps: float = EPS) -> Tensor:
    """(B, C, H, W) -> each (image, channel) map with zero mean and unit (population) variance over H, W."""
    if feat.dim() != 4:
        raise ValueError(f"channel_standardise expects (B, C, H, W), got {tuple(feat.shape)}")
    mean = feat.mean(dim=(2, 3), keepdim=True)
    var = feat.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (feat - mean) / (var + eps).sqrt()


def pkd_loss(student: Tensor, teacher: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
    """PKD loss of one level: ``mean_{b,c,h,w} w[b,h,w] * (z(student) - z(teacher))**2 / 2``, z the per-image,
    per-channel standardisation (``channel_standardise``).

    ``student`` has the teacher's channel count (adapt it first). The teacher is detached. ``pixel_weight``
    (B, H, W) (AID) multiplies each pixel's squared error (divided by the element count, not the weights' sum): a
    pixel of weight w gets w times the gradient (with respect to the standardised student features) of an equal
    pixel of weight 1; ``None`` or all ones give the unweighted loss, which is ``1 - mean Pearson r`` of the
    (image, channel) maps.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"pkd_loss: student {tuple(student.shape)} != teacher {tuple(teacher.shape)} "
                         "(adapt the student to the teacher's channels first)")
    squared = (channel_standardise(student) - channel_standardise(teacher.detach())).pow(2)
    if pixel_weight is not None:
        b, _, h, w = squared.shape
        if tuple(pixel_weight.shape) != (b, h, w):
            raise ValueError(f"pkd_loss: pixel_weight {tuple(pixel_weight.shape)} != {(b, h, w)}")
        squared = squared * pixel_weight.detach().to(device=squared.device, dtype=squared.dtype)[:, None, :, :]
    return squared.mean() / 2


class PKDDistill(DistillMethod):
    """PKD per FPN level: ``{"pkd": pkd_weight * sum_l pkd_loss(A_l(F^S_l), F^T_l)}``.

    Parameters
        pkd_weight: weight of the per-level losses (6.0: MMRazor's Faster R-CNN config; its RetinaNet config 10).

    Owns a 1x1 adapter per level when the channel counts differ (identity otherwise, as MMRazor). AID:
    ``pixel_weights`` and ``level_weights`` apply (the term is pixel-wise); ``image_weights`` are not used.
    """

    name = "pkd"

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, *,
                 pkd_weight: float = 6.0) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        self.pkd_weight = float(pkd_weight)
        self.adapters = nn.ModuleList(
            make_adapter(student_channels, teacher_channels) if student_channels != teacher_channels
            else nn.Identity()
            for _ in range(num_levels))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pkd_weight={self.pkd_weight}"

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        self.check(inputs)
        total: Tensor | float = 0.0
        for level, (student, teacher) in enumerate(zip(inputs.student, inputs.teacher)):
            loss = pkd_loss(self.adapters[level](student), teacher, self._pixel_weight(inputs, level))
            total = total + self._level_weight(inputs, level) * loss
        return {"pkd": self.pkd_weight * total}
