"""The distiller's wiring invariants: a frozen teacher outside the module tree, a student-only checkpoint."""
from pathlib import Path

import pytest
import torch

from aidkd.data import DetectionDataset, collate_fn, load_kitti_records
from aidkd.engine.config import config_from_dict
from aidkd.engine.module import DetectionTask
from aidkd.models import build_detector, load_detector, model_meta, save_model_file

CLASSES = ["Car", "Pedestrian", "Cyclist"]
METHODS = [{"name": "attention", "params": {"temperature": 0.5}}, {"name": "nonlocal"}]


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(1)
    teacher = build_detector("retinanet", "resnet18", 4, min_size=64, max_size=192, fpn_channels=32)
    return save_model_file(tmp_path / "teacher.pt", teacher, model_meta(teacher, CLASSES, 64, 192, {}))


@pytest.fixture
def batch(synth_root):
    ds = DetectionDataset(load_kitti_records(synth_root, "train"), CLASSES, min_size=64, max_size=192, train=True)
    return collate_fn([ds[i] for i in range(2)])


def make_task(tiny_cfg, teacher_file, aid=True, granularity="instance", **distill):
    cfg = config_from_dict(tiny_cfg(distill={"teacher": {"checkpoint": str(teacher_file)}, "methods": METHODS,
                                             "aid": {"enabled": aid, "granularity": granularity}, **distill}))
    return DetectionTask(cfg, CLASSES)


@pytest.mark.parametrize("granularity", ["instance", "image", "batch", "level"])
def test_teacher_frozen_and_outside_the_module(tiny_cfg, teacher_file, batch, granularity):
    task = make_task(tiny_cfg, teacher_file, granularity=granularity)
    teacher = task.distiller.teacher.model
    task.train()
    assert not teacher.training, "teacher must stay in eval mode (frozen batch norm)"
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in task.parameters()}, "teacher must not be a submodule"
    assert not any(k.startswith("distiller.teacher") for k in task.state_dict())
    losses = task.compute_losses(*batch)
    assert {"distill/attention/am", "distill/attention/at", "distill/nonlocal/nl"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters()), "teacher must get no gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.parameters())
    assert any(p.grad is not None for p in task.distiller.methods.parameters()), "adapters train with the student"
    stats = task.distiller.last_stats
    applied = "level_w" if granularity == "level" else "instance_w"  # level applies (and logs) level weights only
    assert 0 < stats[f"{applied}_min"] <= stats[f"{applied}_mean"] <= stats[f"{applied}_max"] <= 1


def test_global_terms_pixel_reaches_the_global_terms(tiny_cfg, teacher_file, batch):
    """distill.aid.global_terms: pixel hands the instance maps to the global terms; the default hands them none."""
    plain = make_task(tiny_cfg, teacher_file)
    plain.compute_losses(*batch)
    assert plain.distiller.last_inputs.location_weights is None
    cfg = config_from_dict(tiny_cfg(distill={"teacher": {"checkpoint": str(teacher_file)}, "methods": METHODS,
                                             "aid": {"global_terms": "pixel"}}))
    task = DetectionTask(cfg, CLASSES)
    assert task.distiller.aid.global_terms == "pixel"
    losses = task.compute_losses(*batch)
    inputs = task.distiller.last_inputs
    assert inputs.location_weights is inputs.pixel_weights and inputs.location_weights is not None
    assert all(torch.isfinite(v) for v in losses.values())


def test_optimizer_holds_student_and_adapters_only(tiny_cfg, teacher_file):
    task = make_task(tiny_cfg, teacher_file)

    class _T:  # configure_optimizers reads the total steps from the trainer
        estimated_stepping_batches = 10

    task._trainer = None
    type(task).trainer = property(lambda self: _T())
    try:
        opt = task.configure_optimizers()["optimizer"]
    finally:
        del type(task).trainer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    expected = {id(p) for p in list(task.model.parameters()) + list(task.distiller.methods.parameters())
                if p.requires_grad}
    assert in_opt == expected
    assert not in_opt & {id(p) for p in task.distiller.teacher.model.parameters()}


def test_kd_without_aid_has_no_weights(tiny_cfg, teacher_file, batch):
    task = make_task(tiny_cfg, teacher_file, aid=False)
    losses = task.compute_losses(*batch)
    assert task.distiller.last_inputs.pixel_weights is None and "distill/attention/am" in losses


def test_loss_scale_multiplies_every_distillation_term_only(tiny_cfg, teacher_file, batch):
    torch.manual_seed(0)
    plain = make_task(tiny_cfg, teacher_file)
    torch.manual_seed(0)
    scaled = make_task(tiny_cfg, teacher_file, loss_scale=0.04)
    a, b = plain.compute_losses(*batch), scaled.compute_losses(*batch)
    assert a.keys() == b.keys()
    for k in a:
        factor = 0.04 if k.startswith("distill/") else 1.0
        assert torch.allclose(b[k], a[k] * factor, rtol=1e-5, atol=1e-7), k
    with pytest.raises(ValueError, match="loss_scale"):
        make_task(tiny_cfg, teacher_file, loss_scale=0.0)


def test_teacher_class_mismatch_is_refused(tiny_cfg, tmp_path):
    teacher = build_detector("retinanet", "resnet18", 3, min_size=64, max_size=192, fpn_channels=16)
    path = save_model_file(tmp_path / "t2.pt", teacher, model_meta(teacher, ["Car", "Van"], 64, 192, {}))
    with pytest.raises(ValueError, match=r"t2.pt: .*class names: checkpoint has \['Car', 'Van'\]"):
        make_task(tiny_cfg, path)


def test_teacher_arch_mismatch_is_refused(tiny_cfg, teacher_file):
    cfg = config_from_dict(tiny_cfg(distill={"teacher": {"checkpoint": str(teacher_file), "arch": "fcos"},
                                             "methods": METHODS}))
    with pytest.raises(ValueError, match="teacher.pt: .*arch: checkpoint has 'retinanet', expected 'fcos'"):
        DetectionTask(cfg, CLASSES)


def test_teacher_checkpoint_is_read_from_disk_once(tiny_cfg, teacher_file, monkeypatch):
    """Setting up a distillation run reads the teacher file once (it was read, and checked, twice)."""
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    task = make_task(tiny_cfg, teacher_file)
    assert reads.count(str(teacher_file)) == 1, reads
    assert task.distiller.teacher.model.aidkd_meta["fpn_channels"] == 32


def test_module_state_dict_holds_each_student_tensor_once(tiny_cfg, teacher_file):
    """The student has one name in the training module ("model."), not a second one under the distiller."""
    task = make_task(tiny_cfg, teacher_file)
    state = task.state_dict(keep_vars=True)
    assert not any(k.startswith("distiller.student.") for k in state)
    assert len({id(v) for v in state.values()}) == len(state), "a tensor under two names"
    student = {f"model.{k}" for k in task.model.state_dict()}
    assert student <= set(state) and all(k in student or k.startswith("distiller.methods.") for k in state)
    # the distiller still drives the student's mode and gets its gradients through the module's parameters
    task.eval()
    assert not task.distiller.student.training
    task.train()
    assert task.distiller.student is task.model and task.model.training
    assert {id(p) for p in task.model.parameters()} <= {id(p) for p in task.parameters()}


def test_checkpoint_state_with_the_old_student_alias_loads(tiny_cfg, teacher_file):
    """Lightning checkpoints of distillation runs: the layout the earlier code wrote ("model.*" and
    "distiller.methods.*", the alias stripped) and one holding the student under its old second name
    ("distiller.student.*") both load strictly into the module, with the same tensors."""
    torch.manual_seed(3)
    source = make_task(tiny_cfg, teacher_file).state_dict()
    torch.manual_seed(4)
    for layout in ("stripped", "alias_only", "both"):
        state = dict(source)
        if layout != "stripped":
            state.update({f"distiller.student.{k.removeprefix('model.')}": v for k, v in source.items()
                          if k.startswith("model.")})
        if layout == "alias_only":
            state = {k: v for k, v in state.items() if not k.startswith("model.")}
        task = make_task(tiny_cfg, teacher_file)
        ckpt = {"state_dict": state}
        task.on_load_checkpoint(ckpt)
        task.load_state_dict(ckpt["state_dict"], strict=True)
        assert all(torch.equal(v, source[k]) for k, v in task.state_dict().items()), layout


def test_dry_run_fails_loudly_on_normalisation_mismatch(tiny_cfg, tmp_path):
    teacher = build_detector("retinanet", "resnet18", 4, min_size=64, max_size=192, fpn_channels=16,
                             image_mean=[0.5, 0.5, 0.5])
    path = save_model_file(tmp_path / "t3.pt", teacher, model_meta(teacher, CLASSES, 64, 192,
                                                                    {"image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match="normalise differently"):
        make_task(tiny_cfg, path)


def test_distilled_student_checkpoint_loads_alone(tiny_cfg, teacher_file, tmp_path):
    task = make_task(tiny_cfg, teacher_file)
    path = save_model_file(tmp_path / "student.pt", task.model, task.meta)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert set(state) == set(task.model.state_dict()), "the student file holds the student alone"
    model, meta = load_detector(path, classes=CLASSES)
    assert meta["fpn_channels"] == 16
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_distill_run_logs_terms_and_weight_images(tiny_cfg, teacher_file):
    """A short distillation run logs every term, AID weight statistics and the weight / attention images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aidkd.engine.run import train

    cfg = config_from_dict(tiny_cfg("kd_images", train={"epochs": 1, "progress_bar": False},
                                    distill={"teacher": {"checkpoint": str(teacher_file)}, "methods": METHODS,
                                             "aid": {"enabled": True}, "image_log_every": 1}))
    train(cfg)
    events = next((Path(cfg.output_dir) / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"distill/instance_weights", "distill/teacher_spatial_attention"} <= set(acc.Tags()["images"])
    scalars = set(acc.Tags()["scalars"])
    assert {"train/distill/attention/am", "train/distill/nonlocal/nl", "aid/instance_w_mean",
            "aid/instance_w_min", "aid/instance_w_max"} <= scalars
    w = [e.value for e in acc.Scalars("aid/instance_w_mean")]
    assert all(0 < v <= 1 for v in w)
    # the instance weights themselves, with their classes, for the report's histogram (one line a logging step)
    from aidkd.report import read_aid_weights

    weights, classes, steps = read_aid_weights(Path(cfg.output_dir) / "aid_weights.jsonl")
    assert weights and len(weights) == len(classes) and set(classes) <= {"Car", "Pedestrian", "Cyclist"}
    assert all(0 < v <= 1 for v in weights) and len(set(steps)) == len(w)
    means = {s: [v for v, t in zip(weights, steps) if t == s] for s in set(steps)}
    assert sorted(sum(v) / len(v) for v in means.values()) == pytest.approx(sorted(w), rel=1e-3)


def test_distill_checkpoint_saves_student_once_and_resumes_exactly(tiny_cfg, teacher_file, monkeypatch):
    """The distiller's second name for the student is not written; a run resumed from that checkpoint ends with the
    same student as an uninterrupted one.

    On some CPUs a sample's teacher losses round differently with the other samples of its batch (convolution
    kernels block over the batch). The uninterrupted run's second epoch reuses the cached losses of the first; a
    resumed run must too (the cache is in the checkpoint), not recompute them in other batches. The batch dependence
    is made explicit here, so the test means the same on every machine."""
    import lightning

    from aidkd.distill import distiller as distiller_mod
    from aidkd.engine.run import train
    from aidkd.models.ops import TeacherLosses

    real = distiller_mod.teacher_losses

    def batch_dependent(model, images, feats, targets, *outputs):
        tl = real(model, images, feats, targets, *outputs)
        factor = 1 + 1e-3 * (sum(int(t["image_id"]) for t in targets) % 7)
        return TeacherLosses([v * factor for v in tl.per_instance], tl.per_level)

    monkeypatch.setattr(distiller_mod, "teacher_losses", batch_dependent)

    class StopAfterFirstEpoch(lightning.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def cfg(name):
        return config_from_dict(tiny_cfg(name, train={"epochs": 2, "progress_bar": False},
                                         distill={"teacher": {"checkpoint": str(teacher_file)}, "methods": METHODS,
                                                  "aid": {"enabled": True}}))

    full = train(cfg("full"))
    train(cfg("resumed"), extra_callbacks=[StopAfterFirstEpoch()])
    last = Path(cfg("resumed").output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert not any(k.startswith("distiller.student.") for k in state)
    assert any(k.startswith("model.") for k in state) and any(k.startswith("distiller.methods.") for k in state)
    assert len(torch.load(last, weights_only=True)["aidkd_teacher_loss_cache"]["cache"]["keys"]) == 16
    resumed = train(cfg("resumed"), resume=True)
    assert resumed == pytest.approx(full, nan_ok=True)
    a = load_detector(Path(cfg("full").output_dir) / "model_last.pt")[0].state_dict()
    b = load_detector(Path(cfg("resumed").output_dir) / "model_last.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_negligible_distillation_trains_the_same_student_as_training_alone(tiny_cfg, teacher_file):
    """Paired comparisons (KD vs the student alone, same seed) need the same initialisation, batches, flips and
    samples: building the distiller (the teacher is a randomly initialised model before its weights load, the
    adapters and non-local blocks are random) must not move the run's random stream. At loss_scale 1e-30 the
    distillation terms do not change a float32 step, so the student must come out as training alone gives it."""
    from aidkd.engine.run import train

    common = {"train": {"epochs": 1, "progress_bar": False}, "data": {"hflip": 0.5}}
    train(config_from_dict(tiny_cfg("alone", **common)))
    train(config_from_dict(tiny_cfg("kd", **common, distill={
        "teacher": {"checkpoint": str(teacher_file)}, "methods": METHODS, "aid": {"enabled": False},
        "loss_scale": 1e-30})))
    a = load_detector(Path(tiny_cfg("alone")["output_dir"]) / "model_last.pt")[0].state_dict()
    b = load_detector(Path(tiny_cfg("kd")["output_dir"]) / "model_last.pt")[0].state_dict()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-6, f"the distillation run trained another student (max weight difference {worst:.3g})"


def test_aid_normalize_from_the_config_makes_the_applied_weights_average_one(tiny_cfg, teacher_file, batch):
    cfg = config_from_dict(tiny_cfg(distill={"teacher": {"checkpoint": str(teacher_file)}, "methods": METHODS,
                                             "aid": {"alpha": 3.0, "normalize": True}}))
    task = DetectionTask(cfg, CLASSES)
    assert task.distiller.aid.normalize and task.distiller.aid.alpha == 3.0
    task.compute_losses(*batch)
    stats = task.distiller.last_stats
    assert stats["instance_w_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["instance_w_max"] > 1 > stats["instance_w_min"]  # the contrast is kept, not flattened
    assert not make_task(tiny_cfg, teacher_file).distiller.aid.normalize  # off unless asked
