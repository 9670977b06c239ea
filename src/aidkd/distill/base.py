"""What every distillation method takes in, the base class it derives from, and the shared helpers.

How AID weights reach a method (the same rule for every method in this package):

- *pixel-wise* terms (attention-masked feature loss, FitNet, FGD fg/bg feature losses, PKD) use ``pixel_weights``
  (one (B, H, W) map per level: the instance weight inside a box's footprint, 1 elsewhere);
- *global* terms (attention transfer, non-local, FGD attention and global terms) use ``image_weights`` (B,); those
  with a per-location residual (spatial attention transfer, the non-local output, FGD's spatial attention and global
  terms) use ``location_weights`` instead when given (one (B, H, W) map per level, weighting each location's
  residual: AID's ``global_terms: pixel``); terms without a location (the channel attentions) keep ``image_weights``;
- *every* term of level ``l`` is multiplied by ``level_weights[l]``.

A weight that is missing (``None``) counts as 1. Weights enter *linearly* in every method: a weight always multiplies
the squared error (or, for FGD's L1 attention term, the absolute error) of its pixel / image, also inside the square
root of the L2-norm terms (attention-masked feature loss, attention transfer, non-local). So at equal residuals a
pixel (image) of weight ``w`` gets ``w`` times the gradient of a pixel (image) of weight 1 in every method, and AID's
``alpha`` means the same everywhere. (For the square-root terms a *constant* weight ``w`` therefore scales the loss by
``sqrt(w)``; for the squared-error terms by ``w``.) All weights equal to 1 give back the unweighted loss exactly.

Reductions of the square-root terms (``Reduction``): the published code (Zhang & Ma; AID) takes
``sqrt(sum over the whole batch)``, so its strength grows with sqrt(per-device batch), sqrt(H*W) and sqrt(C)
(``"published"``). The default ``"normalized"`` form is
``sqrt(mean of the squared errors * reference_elements)``, with ``reference_elements`` the element count of the same
term at the paper's reference setting (``REFERENCE_BATCH`` = 2 images per device, ``REFERENCE_CHANNELS`` = 256,
``reference_cells(stride)`` cells of a level at the 1333x800 input padded to 1344x800). It is invariant to batch
repetition, resolution and FPN width, and equals the published value at the reference setting, so the paper's weights
apply unchanged at any batch size and resolution: ``normalized = published * sqrt(reference_elements / elements)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Reduction = Literal["normalized", "published"]
REDUCTIONS: tuple[str, ...] = ("normalized", "published")
REFERENCE_BATCH = 2  #: images per device in the published runs
REFERENCE_CHANNELS = 256  #: FPN width of the published runs
REFERENCE_INPUT = (800, 1344)  #: (H, W) of the published 1333x800 input, padded to a multiple of 32


def reference_cells(stride: float) -> int:
    """Cells of an FPN level of ``stride`` at the reference input: ``ceil(800 / s) * ceil(1344 / s)``."""
    h, w = REFERENCE_INPUT
    return math.ceil(h / stride) * math.ceil(w / stride)


def check_reduction(reduction: str, where: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def root_sum_squares(residual: Tensor, weights: Tensor | None = None, *, reduction: Reduction = "normalized",
                     reference_elements: float = 1.0) -> Tensor:
    """``sqrt(sum(weights * residual**2))`` (``"published"``), or ``sqrt(mean(weights * residual**2) *
    reference_elements)`` (``"normalized"``; the mean over all ``residual.numel()`` elements).

    ``weights`` (broadcastable to ``residual``, detached) multiply the squared error: linear in the weight. Uses
    ``vector_norm`` (of ``residual * sqrt(weights)``) so the gradient at a zero residual is 0, not NaN.
    """
    check_reduction(reduction, "root_sum_squares")
    if weights is not None:
        residual = residual * weights.detach().to(device=residual.device, dtype=residual.dtype).clamp(min=0).sqrt()
    norm = torch.linalg.vector_norm(residual)
    if reduction == "published":
        return norm
    return norm * math.sqrt(reference_elements / max(1, residual.numel()))


@dataclass
class DistillInputs:
    """Everything a distillation method sees for one batch (docs/architecture.md).

    student: per FPN level (finest first) the student features (B, Cs, H, W).
    teacher: per level the teacher features (B, Ct, H, W), detached.
    strides: per level the feature stride in input pixels.
    boxes: per image the ground-truth boxes (N_i, 4), xyxy in input-tensor pixels.
    pixel_weights: per level (B, H, W): AID weight inside boxes, 1 elsewhere; ``None`` = all ones.
    image_weights: (B,) weights of the global terms; ``None`` = all ones.
    level_weights: (L,) one weight per level for all its terms; ``None`` = all ones.
    head: the head outputs of both detectors and the student's assignment (``aidkd.distill.head.HeadInputs``),
        set when a head method is among the methods; ``None`` otherwise.
    location_weights: per level (B, H, W): per-location weights of the global terms that have a per-location
        residual, replacing ``image_weights`` for them (module docstring); ``None`` = they take ``image_weights``.
    """

    student: list[Tensor]
    teacher: list[Tensor]
    strides: list[int]
    boxes: list[Tensor]
    pixel_weights: list[Tensor] | None = None
    image_weights: Tensor | None = None
    level_weights: Tensor | None = None
    head: Any = None
    location_weights: list[Tensor] | None = None


class DistillMethod(nn.Module):
    """Base of the method modules: owns adapters / learnable parts for ``num_levels`` FPN levels.

    Subclasses set ``name`` and implement ``forward(inputs: DistillInputs) -> dict[str, Tensor]`` that returns named,
    already weighted loss terms summed over levels. ``check(inputs)`` (called by ``forward``) fails loudly, naming
    the level, when the inputs do not fit the module.
    """

    name: ClassVar[str] = "base"
    uses_boxes: ClassVar[bool] = False
    uses_head: ClassVar[bool] = False  #: reads ``DistillInputs.head`` (``aidkd.distill.head``)

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int) -> None:
        super().__init__()
        for what, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels),
                            ("num_levels", num_levels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name}: {what} must be a positive int, got {value!r}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.num_levels = num_levels

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"num_levels={self.num_levels}")

    def _level_name(self, level: int, inputs: DistillInputs) -> str:
        if len(inputs.strides) == len(inputs.student) and level < len(inputs.strides):
            return f"level {level} (stride {inputs.strides[level]})"
        return f"level {level}"

    def check(self, inputs: DistillInputs) -> None:
        """Validate level count, shapes and channel counts; raise ``ValueError`` naming the offending level."""
        n = self.name
        L = self.num_levels
        if len(inputs.student) != L or len(inputs.teacher) != L:
            raise ValueError(f"{n}: built for {L} FPN levels but got {len(inputs.student)} student and "
                             f"{len(inputs.teacher)} teacher levels")
        if len(inputs.strides) != L:
            raise ValueError(f"{n}: got {len(inputs.strides)} strides for {L} levels")
        batch = inputs.student[0].shape[0] if inputs.student[0].dim() == 4 else None
        for i, (s, t) in enumerate(zip(inputs.student, inputs.teacher)):
            where = f"{n}: {self._level_name(i, inputs)}"
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(f"{where}: features must be (B, C, H, W); got student {tuple(s.shape)}, "
                                 f"teacher {tuple(t.shape)}")
            if s.shape[0] != t.shape[0] or s.shape[0] != batch:
                raise ValueError(f"{where}: batch size mismatch: student {s.shape[0]}, teacher {t.shape[0]} "
                                 f"(level 0 has {batch})")
            if s.shape[-2:] != t.shape[-2:]:
                raise ValueError(f"{where}: spatial size mismatch: student {tuple(s.shape[-2:])} vs teacher "
                                 f"{tuple(t.shape[-2:])}")
            if s.shape[1] != self.student_channels:
                raise ValueError(f"{where}: student has {s.shape[1]} channels but the adapter expects "
                                 f"{self.student_channels}")
            if t.shape[1] != self.teacher_channels:
                raise ValueError(f"{where}: teacher has {t.shape[1]} channels but the adapter expects "
                                 f"{self.teacher_channels}")
            for what, maps in (("pixel_weights", inputs.pixel_weights), ("location_weights", inputs.location_weights)):
                if maps is None:
                    continue
                if len(maps) != L:
                    raise ValueError(f"{n}: got {len(maps)} {what} maps for {L} levels")
                expected = (s.shape[0], s.shape[2], s.shape[3])
                if tuple(maps[i].shape) != expected:
                    raise ValueError(f"{where}: {what} shape {tuple(maps[i].shape)} != {expected} (B, H, W)")
        if inputs.image_weights is not None and tuple(inputs.image_weights.shape) != (batch,):
            raise ValueError(f"{n}: image_weights shape {tuple(inputs.image_weights.shape)} != ({batch},)")
        if inputs.level_weights is not None and tuple(inputs.level_weights.shape) != (L,):
            raise ValueError(f"{n}: level_weights shape {tuple(inputs.level_weights.shape)} != ({L},)")
        if self.uses_boxes:
            if len(inputs.boxes) != batch:
                raise ValueError(f"{n}: got boxes for {len(inputs.boxes)} images but the batch has {batch}")
            for b, bx in enumerate(inputs.boxes):
                if bx.dim() != 2 or bx.shape[-1] != 4:
                    raise ValueError(f"{n}: boxes of image {b} must be (N, 4) xyxy, got {tuple(bx.shape)}")

    @staticmethod
    def _pixel_weight(inputs: DistillInputs, level: int) -> Tensor | None:
        return None if inputs.pixel_weights is None else inputs.pixel_weights[level]

    @staticmethod
    def _location_weight(inputs: DistillInputs, level: int) -> Tensor | None:
        return None if inputs.location_weights is None else inputs.location_weights[level]

    @staticmethod
    def _level_weight(inputs: DistillInputs, level: int) -> Tensor | float:
        return 1.0 if inputs.level_weights is None else inputs.level_weights[level].detach()


def make_adapter(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1x1 conv adapter from student to teacher channels."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)


def weighted_norm(residual: Tensor, image_weights: Tensor | None = None, *, reduction: Reduction = "published",
                  reference_elements: float = 1.0, location_weights: Tensor | None = None) -> Tensor:
    """L2 norm of ``residual`` (B, ...) over the whole batch, each image's squared residual times its weight.

    ``sqrt(sum_b w_b * ||r_b||**2)`` (``"published"``, the default here: the raw norm), or the ``"normalized"`` form
    of ``root_sum_squares``. Equal to ``||r||_2`` when all weights are 1; an image of weight ``w`` gets ``w`` times
    the gradient of an image of weight 1 with the same residual. ``location_weights`` (B, H, W), for a residual
    whose last two dimensions are H, W, weight each location's squared residual instead of the image weights.
    """
    weights = None
    if location_weights is not None:
        if tuple(location_weights.shape) != (residual.shape[0], *residual.shape[-2:]):
            raise ValueError(f"weighted_norm: location_weights {tuple(location_weights.shape)} do not fit the "
                             f"residual {tuple(residual.shape)}")
        weights = location_weights.view(residual.shape[0], *([1] * (residual.dim() - 3)), *residual.shape[-2:])
    elif image_weights is not None:
        weights = image_weights.view(-1, *([1] * (residual.dim() - 1)))
    return root_sum_squares(residual, weights, reduction=reduction, reference_elements=reference_elements)


def weighted_batch_mean(per_image: Tensor, image_weights: Tensor | None = None) -> Tensor:
    """``sum_b w_b * per_image[b] / B`` (the plain batch mean when weights are ``None`` or all 1)."""
    if image_weights is not None:
        per_image = per_image * image_weights.detach().to(device=per_image.device, dtype=per_image.dtype)
    return per_image.sum() / per_image.shape[0]


def box_cell_membership(boxes: Tensor, height: int, width: int, stride: float, *, claim_centre: bool = True) -> Tensor:
    """Which feature cells each box of one image covers: bool (N, H, W).

    A cell (x, y) belongs to box k when its centre ``((x + 0.5) * stride, (y + 0.5) * stride)`` lies inside the box
    (``x1 <= cx < x2`` and ``y1 <= cy < y2``). With ``claim_centre`` (default) a box that covers no cell centre
    (small boxes, boxes off the map) claims the cell holding its own centre, clamped into the map, so every box
    covers at least one cell. Vectorised over boxes and cells.
    """
    member, empty, centre_row, centre_col = _cell_cover(boxes, height, width, stride)
    if claim_centre and member.shape[0]:
        k = torch.arange(member.shape[0], device=member.device)
        # Set the centre cell of empty boxes without a host sync: non-empty boxes write their (already True or
        # False) value back unchanged.
        current = member[k, centre_row, centre_col]
        member[k, centre_row, centre_col] = current | empty
    return member


def _cell_cover(boxes: Tensor, height: int, width: int, stride: float
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cells whose centre lies in each box (..., N, H, W), which boxes cover none (..., N), and each box's centre
    cell (row, column: (..., N) each). ``boxes`` (..., N, 4): one image's, or a padded batch's."""
    device = boxes.device
    boxes = boxes.to(torch.float32)
    cx = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride  # (W,)
    cy = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride  # (H,)
    x1, y1, x2, y2 = boxes.unbind(-1)
    inside_x = (cx >= x1[..., None]) & (cx < x2[..., None])  # (..., N, W)
    inside_y = (cy >= y1[..., None]) & (cy < y2[..., None])  # (..., N, H)
    member = inside_y[..., :, None] & inside_x[..., None, :]  # (..., N, H, W)
    empty = ~(inside_x.any(dim=-1) & inside_y.any(dim=-1))  # (..., N): no cell centre inside
    centre_col = torch.floor((x1 + x2) / 2 / stride).long().clamp(0, width - 1)
    centre_row = torch.floor((y1 + y2) / 2 / stride).long().clamp(0, height - 1)
    return member, empty, centre_row, centre_col


def box_cell_owner(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    """For one image, the index of the box that owns each feature cell, or -1 for background. Shape (H, W), int64.

    A cell whose centre lies in one or more boxes belongs to the smallest of them (by area in pixels). A box that
    covers no cell centre claims the cell holding its own centre only if no box covers that cell; where several such
    boxes claim one cell, the smallest wins. Ties go to the lower index. (So a tiny box never takes the only cell of
    a larger box that covers it.)
    """
    valid = torch.ones((1, boxes.shape[0]), dtype=torch.bool, device=boxes.device)
    return box_cell_owner_levels(boxes.reshape(1, -1, 4), valid, [(height, width)], [stride]).view(height, width)


@functools.lru_cache(maxsize=32)
def _level_cells(shapes: tuple[tuple[int, int], ...], strides: tuple[float, ...], device: torch.device
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every cell of every level, flattened level after level (row-major within a level): centre x, centre y (C,),
    the level one-hot (C, L), and per level its first cell, height, width and stride (L,) each. Constant for a
    padded size, so built once and reused (no ops per step)."""
    xs, ys, levels = [], [], []
    for level, ((h, w), s) in enumerate(zip(shapes, strides)):
        cy, cx = torch.meshgrid((torch.arange(h, dtype=torch.float32, device=device) + 0.5) * s,
                                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * s, indexing="ij")
        xs.append(cx.flatten())
        ys.append(cy.flatten())
        levels.append(torch.full((h * w,), level, device=device))
    one_hot = torch.nn.functional.one_hot(torch.cat(levels), len(shapes)).to(torch.float32)
    sizes = torch.tensor([h * w for h, w in shapes], device=device)
    starts = sizes.cumsum(0) - sizes
    hw = torch.tensor(shapes, device=device)
    return (torch.cat(xs), torch.cat(ys), one_hot, starts, hw,
            torch.tensor(strides, dtype=torch.float32, device=device))


def split_levels(flat: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """(B, C) values of every cell of every level (flattened as :func:`box_cell_owner_levels` does) as per level
    (B, H_l, W_l) views."""
    return [v.view(flat.shape[0], h, w) for v, (h, w) in zip(flat.split([h * w for h, w in shapes], dim=1), shapes)]


def box_cell_owner_levels(boxes: Tensor, valid: Tensor, shapes: list[tuple[int, int]], strides: list[float]
                          ) -> Tensor:
    """:func:`box_cell_owner` of a padded batch and every FPN level at once (one batched op: no loop over images,
    boxes or levels, no host sync):
    ``boxes`` (B, M, 4), ``valid`` (B, M), ``shapes`` [(H_l, W_l)], ``strides`` [s_l]; returns (B, C) int64, the
    levels' cells flattened one after the other (row-major; :func:`split_levels` gives them back per level), equal
    image by image and level by level to ``box_cell_owner(boxes[b][valid[b]], H_l, W_l, s_l)``."""
    batch, num = boxes.shape[:2]
    shapes = [(int(h), int(w)) for h, w in shapes]
    if num == 0:
        return torch.full((batch, sum(h * w for h, w in shapes)), -1, dtype=torch.long, device=boxes.device)
    cell_x, cell_y, one_hot, starts, hw, level_strides = _level_cells(
        tuple(shapes), tuple(float(s) for s in strides), boxes.device)
    x1, y1, x2, y2 = (v[..., None] for v in boxes.to(torch.float32).unbind(-1))  # (B, M, 1) each
    covered = (cell_x >= x1) & (cell_x < x2) & (cell_y >= y1) & (cell_y < y2) & valid[..., None]  # (B, M, C)
    # per level, boxes that cover no cell centre there claim the cell holding their centre (clamped into the map)
    empty = (covered.to(torch.float32) @ one_hot) == 0  # (B, M, L)
    col = torch.floor((x1 + x2) / 2 / level_strides).long().clamp(min=0).minimum(hw[:, 1] - 1)  # (B, M, L)
    row = torch.floor((y1 + y2) / 2 / level_strides).long().clamp(min=0).minimum(hw[:, 0] - 1)
    claims = torch.zeros_like(covered).scatter_(2, starts + row * hw[:, 1] + col, empty & valid[..., None])
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)  # (B, M, 1)
    inf = torch.full_like(area, float("inf"))
    # the smallest box (argmin: the first minimum, so ties go to the lower index); a covering box beats a claim
    by_cover = torch.where(covered, area, inf).argmin(dim=1)  # (B, C)
    by_claim = torch.where(claims, area, inf).argmin(dim=1)
    return torch.where(covered.any(dim=1), by_cover, torch.where(claims.any(dim=1), by_claim, -1))
