"""The distiller: a frozen teacher, a trainable student and the distillation methods between their FPN features
and, for the head methods (``head.py``), their head outputs.

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
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from aidkd.distill.aid import AIDWeighting
from aidkd.distill.base import DistillInputs
from aidkd.distill.head import HeadInputs
from aidkd.distill.registry import build_method
from aidkd.distill.teacher_cache import TeacherLossCache, share_across_ranks
from aidkd.models.ops import (
    assign_batch,
    assign_locations,
    detection_losses,
    extract_features,
    feature_strides,
    get_ops,
    head_outputs,
    prepare_inputs,
    same_assignment,
    teacher_loss_parts,
    teacher_losses,
)

log = logging.getLogger("aidkd.distill")


class StepAssignment(NamedTuple):
    """The student's assignment of its anchors / locations to a batch's boxes ([B, A]) and its anchors per level:
    shared with the teacher's losses when both detectors assign alike (``same_assignment``)."""

    matched: Tensor
    num_per_level: list[int]

    def of(self, idx: list[int] | None) -> StepAssignment:
        """The assignment of images ``idx`` of the batch (all when ``None``)."""
        return self if idx is None else StepAssignment(self.matched[idx], self.num_per_level)

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

    @torch.no_grad()
    def head_outputs(self, images: ImageList, features):
        """The head's outputs on ``features`` in float32 with autocast off, as the teacher's losses compute them
        (so the two can share them)."""
        self.model.eval()
        with torch.autocast(images.tensors.device.type, enabled=False):
            return head_outputs(self.model, ImageList(images.tensors.float(), images.image_sizes),
                                OrderedDict((k, v.float()) for k, v in features.items()))


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
                 teacher_loss_cache: bool = True, teacher_loss_cache_max_items: int = 200_000):
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
        self.uses_head = any(m.uses_head for m in self.methods.values())
        self.family = self._check_heads(sample_shape) if self.uses_head else None
        # the teacher's losses and the head methods reuse the student's assignment of each step (it depends only on
        # the boxes, the anchors and the assigner's settings, which are then the same)
        self.shares_assignment = same_assignment(student, teacher) and (aid is not None or self.uses_head)
        if self.uses_head and aid is not None and aid.granularity == "level":
            raise ValueError("head methods (" + ", ".join(k for k, m in self.methods.items() if m.uses_head)
                             + ") take instance, image or batch AID weights; set distill.aid.granularity to one of them")
        # decoupled AID splits D^T for the head methods' cls / box terms; feature methods use the total
        self.decoupled = bool(aid is not None and aid.decoupled and self.uses_head)
        if aid is not None and aid.decoupled and not self.uses_head:
            log.warning("distill.aid.decoupled applies to head methods (ld, logit_kd, cross_head) only; the feature "
                        "methods %s use exp(-alpha D^T)", sorted(self.methods))
        # instance / image AID: the teacher's per-instance losses of a sample seen before (teacher_cache.py)
        self.loss_cache = (TeacherLossCache(teacher_loss_cache_max_items) if teacher_loss_cache and aid is not None
                           and aid.granularity != "level" else None)
        self._last_per_instance: list[Tensor] | None = None
        self._last_per_level: Tensor | None = None
        self._cache_counts_at_epoch_start = (0, 0)
        self._cache_epochs = 0  # epochs this cache has seen (a checkpoint without the cache: 0 at epoch N)
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

    @torch.no_grad()
    def _check_heads(self, shape: tuple[int, int]) -> str:
        """Head distillation compares the two heads location by location: the same family, the same anchors /
        locations (strides, sizes, aspect ratios), classes and box coding. Returns the family."""
        s_ops, t_ops = get_ops(self.student), get_ops(self.teacher.model)
        if s_ops.family != t_ops.family:
            raise ValueError(f"head distillation needs a teacher of the student's family; the student is a "
                             f"{s_ops.family} detector, the teacher a {t_ops.family} detector")
        was_training = self.student.training
        self.student.eval()
        images, _ = self.student.transform([torch.zeros(3, *shape)])
        s_out = head_outputs(self.student, images, extract_features(self.student, images))
        t_out = head_outputs(self.teacher.model, images, self.teacher.features(images))
        self.student.train(was_training)
        for method in self.methods.values():
            if method.uses_head:
                method.check_family(s_ops.family)
                method.check_pair(s_ops.family, self.student, self.teacher.model)
        if s_ops.family == "fasterrcnn":
            s_cls = self.student.roi_heads.box_predictor.cls_score.out_features
            t_cls = self.teacher.model.roi_heads.box_predictor.cls_score.out_features
            if s_cls != t_cls:
                raise ValueError(f"head distillation: the student's RoI head has {s_cls} classes, the teacher's {t_cls}")
            s_w, t_w = self.student.roi_heads.box_coder.weights, self.teacher.model.roi_heads.box_coder.weights
            if tuple(s_w) != tuple(t_w):
                raise ValueError(f"head distillation: RoI box coder weights differ: student {s_w}, teacher {t_w}")
            return s_ops.family
        if s_out["num_per_level"] != t_out["num_per_level"]:
            raise ValueError(f"head distillation needs the same anchors / locations per level; a {shape[0]}x{shape[1]}"
                             f" input gives the student {s_out['num_per_level']}, the teacher "
                             f"{t_out['num_per_level']} (strides or anchors per location differ)")
        start = 0
        for level, n in enumerate(s_out["num_per_level"]):
            a, b = s_out["anchors"][0][start:start + n], t_out["anchors"][0][start:start + n]
            if not torch.allclose(a, b):
                raise ValueError(f"head distillation needs the same anchors; level {level} differs: student anchor "
                                 f"{a[0].tolist()}, teacher anchor {b[0].tolist()} (sizes, aspect ratios or strides)")
            start += n
        for key, what in (("cls_logits", "classes"), ("bbox_regression", "box outputs (GFL: reg_max)")):
            if s_out[key].shape[-1] != t_out[key].shape[-1]:
                raise ValueError(f"head distillation: the student's head has {s_out[key].shape[-1]} {what} per "
                                 f"location, the teacher's {t_out[key].shape[-1]}")
        return s_ops.family

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.student.train(mode)  # not a submodule (see the class doc), but it trains with the distiller
        self.teacher.model.eval()
        return self

    # ------------------------------------------------------------------ one step
    def _teacher_losses(self, image_list: ImageList, t_feats, targets: list[dict], t_out: dict | None = None,
                        run_autocast: tuple[bool, torch.dtype] | None = None) -> tuple[list[Tensor], Tensor | None]:
        """Per-instance teacher losses (and per-level ones for level AID): :meth:`_teacher_terms` without the
        decoupled parts."""
        return self._teacher_terms(image_list, t_feats, targets, t_out, run_autocast)[:2]

    def _teacher_terms(self, image_list: ImageList, t_feats, targets: list[dict], t_out: dict | None = None,
                       run_autocast: tuple[bool, torch.dtype] | None = None, assignment: StepAssignment | None = None
                       ) -> tuple[list[Tensor], Tensor | None, dict[str, list[Tensor]] | None]:
        """Per-instance teacher losses (and per-level ones for level AID); samples in the cache skip the head.

        Computed in float32 with autocast off: under bf16/fp16 autocast the head, the proposals and the boxes of the
        teacher's loss would be rounded (Faster R-CNN's D^T moved by up to 0.4). The teacher's features come in as
        computed (possibly half precision) and are cast up; a sample's own crop (``_teacher_losses_fp32``) runs the
        teacher's backbone under the run's autocast (``run_autocast``: (enabled, dtype), default the current one),
        like the batch's features. ``t_out``: the head's outputs on the whole batch (``FrozenTeacher.head_outputs``,
        computed so), reused instead of running the head again. With decoupled AID also the cls / box parts of the
        per-instance losses (else ``None``). ``assignment``: the student's of this batch, used on the batch's own
        padded size instead of assigning again (``shares_assignment``)."""
        device = image_list.tensors.device.type
        if run_autocast is None:
            run_autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return self._teacher_losses_fp32(ImageList(image_list.tensors.float(), image_list.image_sizes),
                                             OrderedDict((k, v.float()) for k, v in t_feats.items()), targets, t_out,
                                             run_autocast, assignment)

    def _instance_losses(self, images: ImageList, feats, targets: list[dict], outputs: dict | None,
                         assignment: StepAssignment | None = None
                         ) -> tuple[list[Tensor], Tensor | None, dict[str, list[Tensor]] | None]:
        if outputs is None and (self.decoupled or assignment is not None):
            outputs = self.teacher.head_outputs(images, feats)  # once for both reductions
        if assignment is not None and outputs["num_per_level"] == assignment.num_per_level:
            outputs = {**outputs, "matched": assignment.matched}
        tl = teacher_losses(self.teacher.model, images, feats, targets, outputs)
        parts = (teacher_loss_parts(self.teacher.model, images, feats, targets, outputs)
                 if self.decoupled else None)
        return tl.per_instance, tl.per_level, parts

    def _teacher_losses_fp32(self, image_list: ImageList, t_feats, targets: list[dict], t_out: dict | None = None,
                             run_autocast: tuple[bool, torch.dtype] = (False, torch.float32),
                             assignment: StepAssignment | None = None
                             ) -> tuple[list[Tensor], Tensor | None, dict[str, list[Tensor]] | None]:
        if self.loss_cache is None:
            per_instance, per_level, parts = self._instance_losses(image_list, t_feats, targets, t_out, assignment)
            per_level = per_level[self.levels.teacher_idx] if per_level is not None else None
            return per_instance, per_level, parts
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
        # An entry holds the total per instance, or with decoupled AID (N, 3): total, cls, box.
        for shape, idx in groups.items():
            sizes = [image_list.image_sizes[i] for i in idx]
            sub_out = sub_assignment = None
            if shape == padded:
                whole = len(idx) == len(targets)
                sub_images = image_list if whole else ImageList(image_list.tensors[idx], sizes)
                sub_feats = t_feats if whole else OrderedDict((k, v[idx]) for k, v in t_feats.items())
                sub_out = t_out if whole else None
                sub_assignment = None if assignment is None else assignment.of(None if whole else idx)
            else:
                sub_images = ImageList(image_list.tensors[idx, :, :shape[0], :shape[1]].contiguous(), sizes)
                enabled, dtype = run_autocast
                with torch.autocast(sub_images.tensors.device.type, dtype=dtype, enabled=enabled):
                    sub_feats = self.teacher.features(sub_images)
                sub_feats = OrderedDict((k, v.float()) for k, v in sub_feats.items())
            per_instance, _, parts = self._instance_losses(sub_images, sub_feats, [targets[i] for i in idx], sub_out,
                                                           sub_assignment)
            for j, (i, losses) in enumerate(zip(idx, per_instance)):
                if parts is not None:
                    losses = torch.stack([losses, parts["cls"][j], parts["box"][j]], dim=1)
                found[i] = losses
                self.loss_cache.put(keys[i], losses)
        if self.decoupled:
            return ([v[:, 0] for v in found], None,
                    {"cls": [v[:, 1] for v in found], "box": [v[:, 2] for v in found]})
        return found, None, None

    def _own_padded_shape(self, image_size, batch_padded: tuple[int, int]) -> tuple[int, int]:
        """The shape the teacher's transform pads this image to when it is alone in its batch."""
        d = int(getattr(self.teacher.model.transform, "size_divisible", 32) or 1)
        own = tuple(int(math.ceil(int(x) / d) * d) for x in image_size)
        return own if all(o <= p for o, p in zip(own, batch_padded)) else batch_padded

    def cache_state(self) -> dict | None:
        """The teacher-loss cache and its epoch counters (None without a cache), for checkpoints: a run resumed
        with it uses the very losses an uninterrupted run would (recomputing them in other batches can round
        differently)."""
        if self.loss_cache is None:
            return None
        return {"cache": self.loss_cache.state_dict(), "epochs": self._cache_epochs,
                "counts_at_epoch_start": list(self._cache_counts_at_epoch_start)}

    def load_cache_state(self, state: dict, device: torch.device | str = "cpu") -> None:
        if self.loss_cache is None:
            return
        self.loss_cache.load_state_dict(state["cache"], device)
        self._cache_epochs = int(state["epochs"])
        self._cache_counts_at_epoch_start = tuple(int(x) for x in state["counts_at_epoch_start"])

    def end_epoch(self, epoch: int) -> float | None:
        """The teacher-loss cache's hit rate over the epoch just finished (None without a cache or lookups).

        A sample's key includes its flip, so with ``hflip`` 0.5 its second epoch meets an unseen flip state half the
        time (~50 % hits is normal there) and its third a quarter of the time. From the cache's third epoch on (a
        resumed run's cache is the checkpoint's, and one from a checkpoint without it starts empty, whatever
        ``epoch`` it resumes at; ``epoch`` only names it) a rate below
        ``LOW_HIT_RATE`` therefore means the keys do not repeat (random augmentations other than the flip, or more
        samples than ``max_items``): warns once, since the cache then only costs memory."""
        if self.loss_cache is None:
            return None
        # entries computed by the other processes (DDP): the hit rate does not depend on the number of GPUs
        share_across_ranks(self.loss_cache, device=next(self.teacher.model.parameters()).device)
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
        # head methods: the student's head runs once, for its loss and the distillation
        s_out = head_outputs(student, image_list, s_feats) if self.uses_head or self.shares_assignment else None
        assignment = None
        if self.shares_assignment:  # assigned once: the student's loss, the teacher's losses, the head methods
            s_out["matched"] = assign_batch(student, s_out, targets)
            assignment = StepAssignment(s_out["matched"], list(s_out["num_per_level"]))
        losses = detection_losses(student, image_list, s_feats, targets, s_out)

        t_feats = self.teacher.features(image_list)
        t_out = self.teacher.head_outputs(image_list, t_feats) if self.uses_head else None
        s_all, t_all = list(s_feats.values()), list(t_feats.values())
        s_sel = [s_all[i] for i in self.levels.student_idx]
        t_sel = [t_all[i].detach() for i in self.levels.teacher_idx]
        boxes = [t["boxes"] for t in targets]

        pixel_w = image_w = level_w = location_w = parts = None
        if self.aid is not None:
            # the weights in float32 under autocast too (_teacher_losses: D^T as well)
            device = image_list.tensors.device.type
            run_autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            with torch.no_grad(), torch.autocast(device, enabled=False):
                per_instance, per_level, parts = self._teacher_terms(image_list, t_feats, targets, t_out,
                                                                     run_autocast, assignment)
                weights = self.aid.make(per_instance, per_level, boxes, [tuple(f.shape[-2:]) for f in s_sel],
                                        self.levels.strides, len(images))
                pixel_w, image_w, level_w = weights
                location_w = self.aid.location_weights(weights)
                self._last_per_instance, self._last_per_level = per_instance, per_level
        head = (self._head_inputs(image_list, targets, s_feats, t_feats, s_out, t_out, parts, image_w)
                if self.uses_head else None)
        inputs = DistillInputs(student=s_sel, teacher=t_sel, strides=self.levels.strides, boxes=boxes,
                               pixel_weights=pixel_w, image_weights=image_w, level_weights=level_w, head=head,
                               location_weights=location_w)
        self.last_inputs = inputs
        for name, method in self.methods.items():
            for term, value in method(inputs).items():
                losses[f"distill/{name}/{term}"] = value * self.loss_scale
        return losses

    @torch.no_grad()
    def _head_inputs(self, image_list: ImageList, targets: list[dict], s_feats, t_feats, s_out: dict, t_out: dict,
                     parts: dict[str, list[Tensor]] | None, image_w: Tensor | None) -> HeadInputs:
        """The head methods' inputs: both heads' outputs, the student's assignment and the instance weights
        (instance AID: each box's weight, background 1; image / batch AID: the image's weight -- for batch the
        batch's mean -- everywhere; decoupled: separate cls / box weights)."""
        if self.family == "fasterrcnn":
            matched = None
        elif "matched" in s_out:
            matched = list(s_out["matched"].unbind(0))
        else:
            matched = assign_locations(self.student, s_out, targets)
        cls_w = box_w = background = None
        if self.aid is not None:
            if self.aid.granularity in ("image", "batch"):
                background = image_w
                cls_w = box_w = [image_w[b].expand(t["boxes"].shape[0]) for b, t in enumerate(targets)]
            elif parts is not None:
                cls_w, box_w = self.aid.instance_weights(parts["cls"]), self.aid.instance_weights(parts["box"])
            else:
                cls_w = box_w = self.aid.last_instance_weights
        return HeadInputs(family=self.family, student=s_out, teacher=t_out, matched=matched, targets=targets,
                          student_model=self.student, teacher_model=self.teacher.model, images=image_list,
                          student_features=s_feats, teacher_features=t_feats, cls_weights=cls_w, box_weights=box_w,
                          background_weights=background)
