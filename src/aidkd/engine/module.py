"""The LightningModule that trains a detector, alone or distilled from a frozen teacher."""
from __future__ import annotations

import logging
import math
import random

import lightning as L
import numpy as np
import torch
from torch import Tensor

from aidkd.engine.config import RunConfig
from aidkd.engine.model_io import load_detector, model_meta
from aidkd.eval import DetectionEvaluator
from aidkd.models import build_detector
from aidkd.models.ops import detection_losses, extract_features, prepare_inputs

log = logging.getLogger("aidkd.engine")


class NonFiniteLossError(RuntimeError):
    pass


class DetectionTask(L.LightningModule):
    """Trains ``cfg.model`` on ``classes``; with ``cfg.distill`` set, distils it from the configured teacher.

    Only trainable parts live in the module tree: the student (``self.model``) and, when distilling, the
    distillation modules (``self.distiller.methods``). The teacher sits outside it (see ``Distiller``).
    """

    def __init__(self, cfg: RunConfig, classes: list[str], val_records=None, kitti_metrics: bool = False,
                 model: torch.nn.Module | None = None, with_teacher: bool = True):
        super().__init__()
        self.cfg = cfg
        self.classes = list(classes)
        m = cfg.model
        self.model = model if model is not None else build_detector(m.arch, m.backbone, len(classes) + 1, min_size=cfg.data.min_size,
                                    max_size=cfg.data.max_size, fpn_channels=m.fpn_channels, weights=m.weights,
                                    backbone_weights=m.backbone_weights,
                                    trainable_backbone_layers=m.trainable_backbone_layers,
                                    new_classes=m.new_classes, **m.kwargs)
        self.meta = model_meta(self.model, self.classes, cfg.data.min_size, cfg.data.max_size, m.kwargs)
        self.distiller = self._build_distiller() if cfg.distill is not None and with_teacher else None
        self.val_records = val_records
        self.kitti_metrics = kitti_metrics
        self.bad_steps = 0
        self._val_preds: list[tuple[int, dict]] = []
        self.last_metrics: dict[str, float] = {}
        self.validated_step = -1  # global step of last_metrics

    # ------------------------------------------------------------------ building
    def _build_distiller(self):
        from aidkd.distill.aid import AIDWeighting
        from aidkd.distill.distiller import Distiller

        d = self.cfg.distill
        if not d.teacher.checkpoint:
            raise ValueError("distill.teacher.checkpoint is required")
        teacher, tmeta = load_detector(d.teacher.checkpoint, classes=self.classes, arch=d.teacher.arch,
                                       backbone=d.teacher.backbone)
        log.info("teacher %s/%s from %s", tmeta["arch"], tmeta["backbone"], d.teacher.checkpoint)
        methods = {}
        for mc in d.methods:
            key = mc.name if mc.name not in methods else f"{mc.name}_{len(methods)}"
            methods[key] = {"name": mc.name, **mc.params}
        aid = AIDWeighting(granularity=d.aid.granularity, alpha=d.aid.alpha) if d.aid.enabled else None
        shape = (self.cfg.data.min_size, self.cfg.data.max_size)
        return Distiller(self.model, teacher, methods, aid, sample_shape=shape, loss_scale=d.loss_scale,
                         teacher_loss_cache=d.aid.cache)

    def setup(self, stage: str) -> None:
        if self.distiller is not None:
            self.distiller.teacher.to(self.device)

    def on_fit_start(self) -> None:
        if self.distiller is not None:
            self.distiller.teacher.to(self.device)

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        if self.distiller is not None:
            return self.distiller(images, targets)
        image_list, targets = prepare_inputs(self.model, images, targets)
        feats = extract_features(self.model, image_list)
        return detection_losses(self.model, image_list, feats, targets)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.compute_losses(images, targets)
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
        if bad:
            self.bad_steps += 1
            log.warning("step %d: non-finite loss in %s; step skipped (%d in a row)", self.global_step,
                        ", ".join(bad), self.bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_steps} consecutive steps with non-finite losses (last: {', '.join(bad)}); "
                    "stopping. Lower the learning rate or the distillation weights, or check the data.")
            return None
        self.bad_steps = 0
        total = sum(losses.values())
        bs = len(images)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        if self.distiller is not None and self._logging_step():  # AID statistics sync the device: not every step
            for k, v in self.distiller.last_stats.items():
                self.log(f"aid/{k}", float(v), batch_size=bs)
        return total

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logged values (every ``log_every_n_steps``)."""
        trainer = self._trainer
        return trainer is None or self.global_step % max(1, trainer.log_every_n_steps) == 0

    def configure_optimizers(self):
        t = self.cfg.train
        params = [p for p in self.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        milestones = [int(f * total) if f <= 1 else int(f) for f in t.milestones]

        def factor(step: int) -> float:
            warm = 1.0
            if step < t.warmup_steps:
                a = step / max(1, t.warmup_steps)
                warm = t.warmup_factor * (1 - a) + a
            if t.scheduler == "step":
                return warm * t.gamma ** sum(step >= m for m in milestones)
            if t.scheduler == "cosine":
                return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            return warm

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def on_train_epoch_end(self) -> None:
        if self.distiller is not None:
            rate = self.distiller.end_epoch(self.current_epoch)
            if rate is not None:
                self.log("aid/teacher_loss_cache_epoch_hit_rate", rate)

    def on_validation_epoch_start(self) -> None:
        self._val_preds = []

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        preds = self.model(images)
        for p, t in zip(preds, targets):
            sx, sy = (float(v) for v in t.get("scale_xy", (t["scale"], t["scale"])))
            keep = p["scores"] >= self.cfg.eval.score_thresh
            # Back to original pixels with the dataset's exact per-axis factors (validation never flips).
            boxes = p["boxes"][keep].float() / torch.tensor([sx, sy, sx, sy], device=p["boxes"].device)
            self._val_preds.append((int(t["image_id"]), {"boxes": boxes.cpu(), "scores": p["scores"][keep].cpu(),
                                                         "labels": p["labels"][keep].cpu()}))

    def on_validation_epoch_end(self) -> None:
        preds = self._val_preds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, preds)
            preds = [p for part in gathered for p in part]
        if self.trainer.sanity_checking or self.val_records is None:
            return
        unique = dict(preds)  # a distributed sampler may pad with repeated images
        evaluator = DetectionEvaluator(self.val_records, self.classes, kitti=self.kitti_metrics)
        evaluator.update(list(unique.keys()), list(unique.values()))
        metrics = evaluator.compute()
        self.last_metrics = metrics
        self.validated_step = self.global_step
        for k, v in metrics.items():
            self.log(f"val/{k}", float(v), sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only, so the checkpoint loads with weights_only=True.
        checkpoint["aidkd_meta"] = self.meta
        checkpoint["aidkd_config"] = self.cfg.to_dict()
        checkpoint["aidkd_rng"] = rng_state()
        checkpoint["aidkd_bad_steps"] = self.bad_steps
        # The distiller holds the student too: its entries are the "model.*" tensors again, saved once only.
        state = checkpoint.get("state_dict", {})
        for k in [k for k in state if k.startswith(_STUDENT_ALIAS)]:
            del state[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning loads the state dict: restore the student's second name (strict loading needs it).
        state = checkpoint.get("state_dict")
        if self.distiller is not None and state is not None:
            for k, v in list(state.items()):
                if k.startswith("model."):
                    state.setdefault(_STUDENT_ALIAS + k.removeprefix("model."), v)
        if "aidkd_rng" in checkpoint:
            set_rng_state(checkpoint["aidkd_rng"])
        self.bad_steps = int(checkpoint.get("aidkd_bad_steps", 0))


_STUDENT_ALIAS = "distiller.student."


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as weights_only-loadable types (so a resumed run continues exactly)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)], "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
