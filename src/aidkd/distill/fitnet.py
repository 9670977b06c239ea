"""FitNet-style feature imitation (Romero et al., 2015) on FPN features: MSE after a 1x1 adapter per level.

A baseline to compare attention-guided / non-local distillation (and AID on top of either) against.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import DistillInputs, DistillMethod, make_adapter


def fitnet_loss(student: Tensor, teacher: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
    """Mean squared error between adapted student features and (detached) teacher features, both (B, C, H, W).

    ``pixel_weight`` (B, H, W) multiplies each pixel's squared error; the result is divided by the element count
    (not by the weights' sum), so all-ones weights give exactly ``F.mse_loss(student, teacher)`` and a constant
    weight ``w`` gives ``w`` times it.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"fitnet_loss: student {tuple(student.shape)} != teacher {tuple(teacher.shape)} "
                         "(adapt the student to the teacher's channels first)")
    squared = (student - teacher.detach()).pow(2)
    if pixel_weight is not None:
        b, _, h, w = squared.shape
        if tuple(pixel_weight.shape) != (b, h, w):
            raise ValueError(f"fitnet_loss: pixel_weight {tuple(pixel_weight.shape)} != {(b, h, w)}")
        squared = squared * pixel_weight.detach().to(device=squared.device, dtype=squared.dtype)[:, None, :, :]
    return squared.mean()


class FitNetDistill(DistillMethod):
    """FitNet per FPN level: ``{"fitnet": fitnet_weight * sum_l MSE(A_l(F^S_l), F^T_l)}``.

    Parameters
        fitnet_weight: weight of the summed per-level MSE (default 1.0; FPN features are O(1), so the term is of
            the order of the detection losses).

    Owns a 1x1 adapter per level (always present, also when the channel counts match: the usual FitNet regressor).
    AID: ``pixel_weights`` and ``level_weights`` apply; ``image_weights`` are not used (the term is pixel-wise).
    """

    name = "fitnet"

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, *,
                 fitnet_weight: float = 1.0) -> None:
        super().__init__(student_channels, teacher_channels, num_levels)
        self.fitnet_weight = float(fitnet_weight)
        self.adapters = nn.ModuleList(make_adapter(student_channels, teacher_channels) for _ in range(num_levels))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fitnet_weight={self.fitnet_weight}"

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        self.check(inputs)
        total: Tensor | float = 0.0
        for level, (student, teacher) in enumerate(zip(inputs.student, inputs.teacher)):
            loss = fitnet_loss(self.adapters[level](student), teacher, self._pixel_weight(inputs, level))
            total = total + self._level_weight(inputs, level) * loss
        return {"fitnet": self.fitnet_weight * total}
