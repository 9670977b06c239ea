"""The distiller: a frozen teacher, a trainable student and the distillation methods between their FPN features.

The teacher is held *outside* the module tree (`FrozenTeacher` is a plain object, not an ``nn.Module`` attribute),
so it is never in ``state_dict()``, never handed to the optimizer and never wrapped for gradient sync — no
``__setattr__`` tricks. It runs in eval mode under ``torch.no_grad()``: its FPN features every step and, for AID,
its per-instance losses -- the head only for samples not seen before (``teacher_cache.py``).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from aidkd.distill.aid import AIDWeighting
from aidkd.distill.base import DistillInputs
from aidkd.distill.registry import build_method
from aidkd.distill.teacher_cache import TeacherLossCache
from aidkd.models.ops import (
    detection_losses,
    extract_features,
    feature_strides,
    prepare_inputs,
    teacher_losses,
)

log = logging.getLogger("aidkd.distill")

LOW_HIT_RATE = 0.5  #: teacher-loss cache hit rate after the first epoch below which ``end_epoch`` warns


class FrozenTeacher:
    """A trained detector used only for inference: eval mode, no gradients, batch norm statistics frozen."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device) -> FrozenTeacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def features(self, images):
        self.model.eval()  # stays in eval even if someone called .train() on it
        return extract_features(self.model, images)


@dataclass
class LevelMatch:
    """Student level index -> teacher level index, matched by stride."""

    student_idx: list[int]
    teacher_idx: list[int]
    strides: list[int]


def match_levels(s_strides: list[int], t_strides: list[int]) -> LevelMatch:
    common = [s for s in s_strides if s in t_strides]
    if not common:
        raise ValueError(f"student FPN strides {s_strides} and teacher FPN strides {t_strides} share no level; "
                         "distillation needs at least one common stride")
    return LevelMatch([s_strides.index(s) for s in common], [t_strides.index(s) for s in common], common)


class Distiller(nn.Module):
    """The distillation modules (trainable, checkpointed) between a student and a frozen teacher.

    ``forward(images, targets)`` returns the student's detection losses plus every weighted distillation term
    (keys ``distill/<method>/<term>``, each times ``loss_scale``) and AID statistics in ``self.last_stats``.

    Neither detector is a submodule: the student belongs to whoever trains it (``DetectionTask.model``), so it has
    one name in a state dict, and its parameters are not in ``self.parameters()`` (an optimizer takes both, as
    ``DetectionTask.configure_optimizers`` does); ``train()`` / ``eval()`` still switch the student's mode.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, methods: dict[str, dict], aid: AIDWeighting | None,
                 sample_shape: tuple[int, int] = (128, 256), loss_scale: float = 1.0,
                 teacher_loss_cache: bool = True):
        super().__init__()
        if not loss_scale > 0:
            raise ValueError(f"distillation loss_scale must be > 0, got {loss_scale}")
        self.loss_scale = float(loss_scale)
        self._student = [student]  # a list, so nn.Module does not register it (see the class doc)
        self.teacher = FrozenTeacher(teacher)
        self.aid = aid
        self._check_transforms()
        self.levels, s_ch, t_ch = self._dry_run(sample_shape)
        n = len(self.levels.strides)
        self.methods = nn.ModuleDict({name: build_method(params.pop("name", name), s_ch, t_ch, n, **params)
                                      for name, params in ((k, dict(v)) for k, v in methods.items())})
        if not self.methods:
            raise ValueError("distillation needs at least one method (e.g. attention, nonlocal, fitnet, fgd)")
        # instance / image AID: the teacher's per-instance losses of a sample seen before (teacher_cache.py)
        self.loss_cache = (TeacherLossCache() if teacher_loss_cache and aid is not None
                           and aid.granularity != "level" else None)
        self._last_per_instance: list[Tensor] | None = None
        self._last_per_level: Tensor | None = None
        self._cache_counts_at_epoch_start = (0, 0)
        self._cache_epochs = 0  # epochs this cache has seen: a resumed run starts with an empty one at epoch N
        self._warned_low_hit_rate = False
        self.last_inputs: DistillInputs | None = None

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    @property
    def last_stats(self) -> dict[str, float]:
        """AID weight statistics of the last step (computed on request: they sync the device)."""
        if self.aid is None or (self._last_per_instance is None and self._last_per_level is None):
            return {}
        stats = self.aid.stats(self._last_per_instance, self._last_per_level)
        if self.loss_cache is not None:
            seen = self.loss_cache.hits + self.loss_cache.misses
            stats["teacher_loss_cache_hit_rate"] = self.loss_cache.hits / seen if seen else 0.0
        return stats

    # ------------------------------------------------------------------ wiring checks
    def _check_transforms(self) -> None:
        s, t = self.student.transform, self.teacher.model.transform
        if list(s.image_mean) != list(t.image_mean) or list(s.image_std) != list(t.image_std):
            raise ValueError(f"teacher and student normalise differently (mean {t.image_mean} vs {s.image_mean}, "
                             f"std {t.image_std} vs {s.image_std}); they must see the same input tensor")

    @torch.no_grad()
    def _dry_run(self, shape: tuple[int, int]) -> tuple[LevelMatch, int, int]:
        """Run both backbones once on a blank image: every tapped level must exist and shapes must line up."""
        was_training = self.student.training
        self.student.eval()
        images, _ = self.student.transform([torch.zeros(3, *shape)])
        s_feats = extract_features(self.student, images)
        t_feats = self.teacher.features(images)
        self.student.train(was_training)
        if not s_feats or not t_feats:
            raise ValueError("a backbone returned no FPN features")
        match = match_levels(feature_strides(images, s_feats), feature_strides(images, t_feats))
        s_list, t_list = list(s_feats.values()), list(t_feats.values())
        for si, ti, st in zip(match.student_idx, match.teacher_idx, match.strides):
            if s_list[si].shape[-2:] != t_list[ti].shape[-2:]:
                raise ValueError(f"stride {st}: student level {si} is {tuple(s_list[si].shape[-2:])} but teacher "
                                 f"level {ti} is {tuple(t_list[ti].shape[-2:])}")
        s_ch = {f.shape[1] for f in s_list}
        t_ch = {f.shape[1] for f in t_list}
        if len(s_ch) != 1 or len(t_ch) != 1:
            raise ValueError(f"FPN levels must share one width; student {s_ch}, teacher {t_ch}")
        log.info("distiller wired: strides %s, student %d ch -> teacher %d ch", match.strides, *s_ch, *t_ch)
        return match, s_ch.pop(), t_ch.pop()

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.student.train(mode)  # not a submodule (see the class doc), but it trains with the distiller
        self.teacher.model.eval()
        return self

    # ------------------------------------------------------------------ one step
    def _teacher_losses(self, image_list: ImageList, t_feats, targets: list[dict]
                        ) -> tuple[list[Tensor], Tensor | None]:
        """Per-instance teacher losses (and per-level ones for level AID); samples in the cache skip the head.

        Computed in float32 with autocast off: under bf16/fp16 autocast the head, the proposals and the boxes of the
        teacher's loss would be rounded (Faster R-CNN's D^T moved by up to 0.4). The teacher's features come in as
        computed (possibly half precision) and are cast up."""
        with torch.autocast(image_list.tensors.device.type, enabled=False):
            return self._teacher_losses_fp32(ImageList(image_list.tensors.float(), image_list.image_sizes),
                                             OrderedDict((k, v.float()) for k, v in t_feats.items()), targets)

    def _teacher_losses_fp32(self, image_list: ImageList, t_feats, targets: list[dict]
                             ) -> tuple[list[Tensor], Tensor | None]:
        if self.loss_cache is None:
            tl = teacher_losses(self.teacher.model, image_list, t_feats, targets)
            per_level = tl.per_level[self.levels.teacher_idx] if tl.per_level is not None else None
            return tl.per_instance, per_level
        padded = tuple(image_list.tensors.shape[-2:])
        keys = [self.loss_cache.key(t, size) for t, size in zip(targets, image_list.image_sizes)]
        found = [self.loss_cache.get(k, t["boxes"].shape[0]) for k, t in zip(keys, targets)]
        # The head on the missing samples only. A sample's losses are those of the sample alone, padded to its own
        # size rather than the batch's, so they (and the key) do not depend on the batch it came in: samples whose
        # own padded shape is the batch's reuse the batch's features; the others run the teacher on their crop.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, value in enumerate(found):
            if value is None:
                groups.setdefault(self._own_padded_shape(image_list.image_sizes[i], padded), []).append(i)
        for shape, idx in groups.items():
            sizes = [image_list.image_sizes[i] for i in idx]
            if shape == padded:
                sub_images = image_list if len(idx) == len(targets) else ImageList(image_list.tensors[idx], sizes)
                sub_feats = t_feats if len(idx) == len(targets) else OrderedDict(
                    (k, v[idx]) for k, v in t_feats.items())
            else:
                sub_images = ImageList(image_list.tensors[idx, :, :shape[0], :shape[1]].contiguous(), sizes)
                sub_feats = self.teacher.features(sub_images)
            tl = teacher_losses(self.teacher.model, sub_images, sub_feats, [targets[i] for i in idx])
            for i, losses in zip(idx, tl.per_instance):
                found[i] = losses
                self.loss_cache.put(keys[i], losses)
        return found, None

    def _own_padded_shape(self, image_size, batch_padded: tuple[int, int]) -> tuple[int, int]:
        """The shape the teacher's transform pads this image to when it is alone in its batch."""
        d = int(getattr(self.teacher.model.transform, "size_divisible", 32) or 1)
        own = tuple(int(math.ceil(int(x) / d) * d) for x in image_size)
        return own if all(o <= p for o, p in zip(own, batch_padded)) else batch_padded

    def end_epoch(self, epoch: int) -> float | None:
        """The teacher-loss cache's hit rate over the epoch just finished (None without a cache or lookups).

        A sample's key includes its flip, so with ``hflip`` 0.5 its second epoch meets an unseen flip state half the
        time (~50 % hits is normal there) and its third a quarter of the time. From the cache's third epoch on (a
        resumed run's cache starts empty, whatever ``epoch`` it resumes at; ``epoch`` only names it) a rate below
        ``LOW_HIT_RATE`` therefore means the keys do not repeat (random augmentations other than the flip, or more
        samples than ``max_items``): warns once, since the cache then only costs memory."""
        if self.loss_cache is None:
            return None
        hits, misses = self.loss_cache.hits, self.loss_cache.misses
        last_hits, last_misses = self._cache_counts_at_epoch_start
        self._cache_counts_at_epoch_start = (hits, misses)
        seen = (hits - last_hits) + (misses - last_misses)
        if not seen:
            return None
        rate = (hits - last_hits) / seen
        self._cache_epochs += 1
        if self._cache_epochs >= 3 and rate < LOW_HIT_RATE and not self._warned_low_hit_rate:
            self._warned_low_hit_rate = True
            log.warning("AID teacher-loss cache: %.0f%% hits in epoch %d (%d entries, max_items %d); keys rarely "
                        "repeat (random augmentations other than the flip, or more samples x flips than max_items). "
                        "Set distill.aid.cache: false to save its memory.", 100 * rate, epoch,
                        len(self.loss_cache), self.loss_cache.max_items)
        return rate

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        student = self.student
        image_list, targets = prepare_inputs(student, images, targets)
        s_feats = extract_features(student, image_list)
        losses = detection_losses(student, image_list, s_feats, targets)

        t_feats = self.teacher.features(image_list)
        s_all, t_all = list(s_feats.values()), list(t_feats.values())
        s_sel = [s_all[i] for i in self.levels.student_idx]
        t_sel = [t_all[i].detach() for i in self.levels.teacher_idx]
        boxes = [t["boxes"] for t in targets]

        pixel_w = image_w = level_w = location_w = None
        if self.aid is not None:
            # the weights in float32 under autocast too (_teacher_losses: D^T as well)
            with torch.no_grad(), torch.autocast(image_list.tensors.device.type, enabled=False):
                per_instance, per_level = self._teacher_losses(image_list, t_feats, targets)
                weights = self.aid.make(per_instance, per_level, boxes, [tuple(f.shape[-2:]) for f in s_sel],
                                        self.levels.strides, len(images))
                pixel_w, image_w, level_w = weights
                location_w = self.aid.location_weights(weights)
                self._last_per_instance, self._last_per_level = per_instance, per_level
        inputs = DistillInputs(student=s_sel, teacher=t_sel, strides=self.levels.strides, boxes=boxes,
                               pixel_weights=pixel_w, image_weights=image_w, level_weights=level_w,
                               location_weights=location_w)
        self.last_inputs = inputs
        for name, method in self.methods.items():
            for term, value in method(inputs).items():
                losses[f"distill/{name}/{term}"] = value * self.loss_scale
        return losses
