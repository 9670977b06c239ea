"""The LightningModule that trains a detector, alone or distilled from a frozen teacher."""
from __future__ import annotations

import logging
import math
import random

import lightning as L
import numpy as np
import torch
from torch import Tensor

from aidkd.data.transforms import resize_samples
from aidkd.engine.config import RunConfig
from aidkd.eval import DetectionEvaluator
from aidkd.eval.evaluator import scored_detections
from aidkd.models import build_detector, load_detector, model_meta
from aidkd.models.ops import detection_losses, extract_features, prepare_inputs

log = logging.getLogger("aidkd.engine")


LARGE_LOSS_SCALE = 100.0  # above this, distill.loss_scale is almost surely a typo (warned)


#: Validation metrics are logged as ``val/<evaluator key>`` (e.g. ``val/coco/AP``).
VAL_PREFIX = "val/"

class NonFiniteLossError(RuntimeError):
    pass


class DetectionTask(L.LightningModule):
    """Trains ``cfg.model`` on ``classes``; with ``cfg.distill`` set, distils it from the configured teacher.

    Only trainable parts live in the module tree, each under one name: the student (``self.model``) and, when
    distilling, the distillation modules (``self.distiller.methods``). The distiller uses the student without
    owning it, and the teacher sits outside the tree (see ``Distiller``).
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
        self.distiller = None
        if cfg.distill is not None and with_teacher:
            # On a forked random stream: loading the teacher (a random model before its weights load) and the
            # adapters' initialisation would otherwise shift the run's stream, and a distillation run would see
            # other batches, flips and samples than the student-alone run of its seed, unpairing the comparison.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.distiller = self._build_distiller()
        self.val_records = val_records
        self.kitti_metrics = kitti_metrics
        if kitti_metrics:  # refused now, not at the end of the first epoch
            from aidkd.eval.kitti_ap import MIN_OVERLAP

            unknown = [c for c in self.classes if c.lower() not in MIN_OVERLAP]
            if unknown:
                raise ValueError(f"KITTI metrics (eval.kitti, on by default for KITTI/synth data) need KITTI classes; "
                                 f"data.classes has {unknown}: set eval.kitti: false or use KITTI class names")
        self.bad_steps = 0
        self.last_bad_step = -(10 ** 9)  # global step of the last non-finite loss
        self._skip_optimizer_step = False
        self._resumed_lr: float | None = None
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
        aid = (AIDWeighting(granularity=d.aid.granularity, alpha=d.aid.alpha, normalize=d.aid.normalize,
                            decoupled=d.aid.decoupled, global_terms=d.aid.global_terms)
               if d.aid.enabled else None)
        if d.loss_scale > LARGE_LOSS_SCALE:
            log.warning("distill.loss_scale=%g multiplies every distillation term by more than %g: they will dwarf "
                        "the detection loss (docs/method.md's weights are tuned at 1; small from-scratch students need "
                        "about 1/1000)",
                        d.loss_scale, LARGE_LOSS_SCALE)
        shape = (self.cfg.data.min_size, self.cfg.data.max_size)
        return Distiller(self.model, teacher, methods, aid, sample_shape=shape, loss_scale=d.loss_scale,
                         teacher_loss_cache=d.aid.cache, teacher_loss_cache_max_items=d.aid.cache_max_items)

    def setup(self, stage: str) -> None:
        if self.distiller is not None:
            self.distiller.teacher.to(self.device)
        if stage == "fit":
            self.speed_up_training()

    def speed_up_training(self) -> None:
        """``train.channels_last`` (student and teacher weights) and ``train.compile`` (the student's backbone and
        head(s), compiled in place: same module tree, same checkpoints); once."""
        if getattr(self, "_sped_up", False):
            return
        self._sped_up = True
        t = self.cfg.train
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
            if self.distiller is not None:
                self.distiller.teacher.model.to(memory_format=torch.channels_last)
        if t.compile:
            compile_detector(self.model)

    def on_fit_start(self) -> None:
        if self.distiller is not None:
            self.distiller.teacher.to(self.device)

    # ------------------------------------------------------------------ training
    def prepare_batch(self, images: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list[dict]]:
        """The training loader's uint8 samples (original size) as float images resized to ``data.min_size`` /
        ``max_size``, boxes and ignore boxes following, where they lie (``aidkd.data.resize_samples``); float
        images are ready and pass as they are."""
        return resize_samples(images, targets, self.cfg.data.min_size, self.cfg.data.max_size)

    def compute_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        # one preparation for the student, the teacher and the distiller (a no-op after the data module's
        # on_after_batch_transfer): a uint8 image must never reach the model's transform, which would normalise
        # 0..255 values silently
        images, targets = self.prepare_batch(images, targets)
        if self.distiller is not None:
            return self.distiller(images, targets)
        image_list, targets = prepare_inputs(self.model, images, targets)
        feats = extract_features(self.model, image_list)
        return detection_losses(self.model, image_list, feats, targets)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.compute_losses(images, targets)
        # One flag for every term, read once (the step's only host sync outside logging steps).
        non_finite = ~torch.stack([torch.isfinite(v).all() for v in losses.values()]).all()
        if self._any_rank(non_finite):
            bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
            self.bad_steps += 1
            self.last_bad_step = self.global_step
            log.warning("step %d: non-finite loss in %s; step skipped (%d in a row)", self.global_step,
                        ", ".join(bad) or "another process", self.bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise NonFiniteLossError(self._non_finite_stop_message(bad))
            # Skipped alike on every process: a zero loss on every trainable parameter keeps DDP's gradient
            # reduction in step (returning None is refused in distributed training); optimizer_step drops it.
            self._skip_optimizer_step = True
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        self.bad_steps = 0
        total = sum(losses.values())
        bs = len(images)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        if self.distiller is not None and self._logging_step():  # AID statistics sync the device: not every step
            for k, v in self.distiller.last_stats.items():
                self.log(f"aid/{k}", float(v), batch_size=bs)
            self._record_aid_weights(targets)
        return total

    def _any_rank(self, flag: Tensor) -> bool:
        """Boolean tensor ``flag`` true on any process of a distributed run (one tiny all-reduce, one host read),
        so all skip or stop together."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = flag.to(device=self.device, dtype=torch.float32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.any())

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        def closure():
            loss = optimizer_closure()
            if self._skip_optimizer_step:  # a skipped step: no gradients, so the optimizer changes nothing
                self._skip_optimizer_step = False
                for p in self.parameters():
                    p.grad = None
                return None  # mixed precision: the grad scaler then skips the step too
            return loss

        optimizer.step(closure=closure)

    def is_finite_state(self) -> bool:
        """No non-finite loss in the last ``train.max_bad_steps`` steps and finite weights: safe to checkpoint."""
        recent = self.global_step - self.last_bad_step <= max(1, self.cfg.train.max_bad_steps)
        return not recent and all(bool(torch.isfinite(p).all()) for p in self.parameters() if p.is_floating_point())

    def _non_finite_stop_message(self, bad: list[str]) -> str:
        lr = self.cfg.train.lr
        change = f"--set train.lr={lr / 10:g}" + (
            f" (or distill.loss_scale={self.cfg.distill.loss_scale / 10:g})" if self.cfg.distill is not None else "")
        terms = ", ".join(bad) or "on another process"
        head = f"{self.bad_steps} consecutive steps with non-finite losses (last: {terms}) at step {self.global_step}; " \
            "stopping."
        from aidkd.engine.callbacks import LastCheckpoint

        good = next((c for c in (self._trainer.callbacks if self._trainer else []) if isinstance(c, LastCheckpoint)),
                    None)
        path = good.good_checkpoint() if good is not None else None
        if path is None:
            return (f"{head} No checkpoint from finite steps exists: start again in this folder with --overwrite "
                    f"{change}, or check the data.")
        return (f"{head} The last checkpoint from finite steps is {path} (step {good.saved_step}); resume from it "
                f"with a lower learning rate: --resume {path} {change}")

    def _record_aid_weights(self, targets: list[dict]) -> None:
        """Append this step's AID instance weights and their classes to ``<output_dir>/aid_weights.jsonl`` (one
        line a logging step: ``step``, ``weights``, ``classes``), the source of the report's weight histogram."""
        aid = self.distiller.aid
        per_instance = getattr(self.distiller, "_last_per_instance", None)
        if aid is None or per_instance is None or self._trainer is None or not self.trainer.is_global_zero:
            return
        weights, classes = [], []
        for w, t in zip(aid.instance_weights(per_instance), targets):
            labels = t["labels"].tolist()
            if len(labels) != w.numel():  # not one weight per positive box: nothing to attribute
                return
            weights += [round(float(v), 5) for v in w.detach().float().cpu()]
            classes += [self.classes[lab - 1] for lab in labels]
        if weights:
            from pathlib import Path

            from aidkd.eval import strict_json

            with open(Path(self.cfg.output_dir) / "aid_weights.jsonl", "a") as f:
                f.write(strict_json({"step": int(self.global_step), "weights": weights, "classes": classes}) + "\n")

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
            self._val_preds.append((int(t["image_id"]), scored_detections(p, t, self.cfg.eval.score_thresh)[1]))

    def on_validation_epoch_end(self) -> None:
        preds = self._val_preds
        # The metrics are computed once, on rank 0, from every rank's predictions, and broadcast.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank_zero = not distributed or torch.distributed.get_rank() == 0
        if distributed:
            gathered: list | None = [None] * torch.distributed.get_world_size() if rank_zero else None
            torch.distributed.gather_object(preds, gathered, dst=0)
            preds = [p for part in gathered for p in part] if rank_zero else []
        if self.trainer.sanity_checking or self.val_records is None:
            return
        metrics = None
        if rank_zero:
            unique = dict(preds)  # a distributed sampler may pad with repeated images
            evaluator = DetectionEvaluator(self.val_records, self.classes, kitti=self.kitti_metrics)
            evaluator.update(list(unique.keys()), list(unique.values()))
            metrics = evaluator.compute()
        if distributed:
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        self.last_metrics = metrics
        self.validated_step = self.global_step
        for k, v in metrics.items():
            self.log(f"{VAL_PREFIX}{k}", float(v), sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only, so the checkpoint loads with weights_only=True.
        checkpoint["aidkd_meta"] = self.meta
        checkpoint["aidkd_config"] = self.cfg.to_dict()
        checkpoint["aidkd_rng"] = rng_state()
        checkpoint["aidkd_bad_steps"] = self.bad_steps
        cache = self.distiller.cache_state() if self.distiller is not None else None
        if cache is not None:
            checkpoint["aidkd_teacher_loss_cache"] = cache
        checkpoint["aidkd_last_bad_step"] = self.last_bad_step  # a resumed run keeps the divergence rule's window

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning loads the state dict. The student once had a second name under the distiller: a
        # checkpoint holding tensors under it loads them as the "model.*" ones they are.
        if checkpoint.get("state_dict") is not None:
            checkpoint["state_dict"] = renamed_state(checkpoint["state_dict"])
        if "aidkd_rng" in checkpoint:
            set_rng_state(checkpoint["aidkd_rng"])
        self.bad_steps = int(checkpoint.get("aidkd_bad_steps", 0))
        if self.distiller is not None and "aidkd_teacher_loss_cache" in checkpoint:
            self.distiller.load_cache_state(checkpoint["aidkd_teacher_loss_cache"], self.device)
        self.last_bad_step = int(checkpoint.get("aidkd_last_bad_step", self.last_bad_step))
        self._resumed_lr = (checkpoint.get("aidkd_config") or {}).get("train", {}).get("lr")

    def on_train_start(self) -> None:
        # A resumed run restores the optimizer's learning rate from the checkpoint: a changed train.lr (the advice
        # after a non-finite stop) must win, at the same point of the schedule.
        lr = self.cfg.train.lr
        if self._resumed_lr is None or self._resumed_lr == lr:
            return
        for sc in self.trainer.lr_scheduler_configs:
            sched = sc.scheduler
            sched.base_lrs = [lr for _ in sched.base_lrs]
            for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas):
                group["initial_lr"] = lr
                group["lr"] = lr * fn(sched.last_epoch)
        log.info("resumed with train.lr=%g (the checkpoint was trained with %g)", lr, self._resumed_lr)


_OLD_STUDENT_ALIAS = "distiller.student."


def renamed_state(state: dict) -> dict:
    """A checkpoint's state dict under today's names (tensors under the student's old second name as ``model.*``)."""
    state = dict(state)
    for k in [k for k in state if k.startswith(_OLD_STUDENT_ALIAS)]:
        state.setdefault("model." + k.removeprefix(_OLD_STUDENT_ALIAS), state.pop(k))
    return state


def compile_detector(model: torch.nn.Module, **compile_kwargs) -> list[str]:
    """``torch.compile`` a detector's backbone and head modules in place (``nn.Module.compile``: parameter names and
    checkpoints unchanged); the Python between them (targets, losses, distillation) stays eager. ``compile_kwargs``
    go to ``torch.compile``. Returns the names of the compiled modules."""
    names = (["backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"] if hasattr(model, "rpn")
             else ["backbone", "head"])
    for name in names:
        model.get_submodule(name).compile(**compile_kwargs)
    return names


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
