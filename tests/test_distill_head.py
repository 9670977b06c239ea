"""Head distillation (ld, logit_kd): the inputs the distiller builds, AID weights per instance, and the invariants
every distillation term keeps (linear weights, batch repetition, pairing, a frozen teacher, student-only files)."""
from pathlib import Path

import pytest
import torch

from aidkd.distill import AIDWeighting, HeadInputs, aid_weights, build_method, valuable_region
from aidkd.distill.distiller import Distiller
from aidkd.engine.config import config_from_dict
from aidkd.models import build_detector, load_detector, model_meta, save_model_file
from aidkd.models.ops import prepare_inputs, teacher_loss_parts

H, W = 64, 192
CASES = [("gfl", "logit_kd"), ("gfl", "ld"), ("retinanet", "logit_kd"), ("fcos", "logit_kd"),
         ("fasterrcnn", "logit_kd"), ("gfl", "cross_head"), ("retinanet", "cross_head"), ("fcos", "cross_head")]


def make_distiller(arch, methods, aid=None, cache=True, teacher_kw=None):
    torch.manual_seed(0)
    teacher = build_detector(arch, "resnet18", 3, min_size=H, max_size=W, fpn_channels=16, **(teacher_kw or {}))
    student = build_detector(arch, "resnet18", 3, min_size=H, max_size=W, fpn_channels=8)
    return Distiller(student, teacher, {k: dict(v) for k, v in methods.items()}, aid, sample_shape=(H, W),
                     teacher_loss_cache=cache).train()


def make_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        images.append(torch.rand(3, H, W, generator=g))
        boxes = torch.tensor([[10.0, 8.0, 60.0, 50.0], [90.0, 4.0, 170.0, 60.0], [120.0, 30.0, 140.0, 48.0]])
        targets.append({"boxes": boxes + i, "labels": torch.tensor([1, 2, 1]), "image_id": i, "flipped": False})
    return images, targets


def head_terms(method, head: HeadInputs, **weights) -> dict[str, torch.Tensor]:
    from dataclasses import replace

    from aidkd.distill import DistillInputs

    inputs = DistillInputs(student=[], teacher=[], strides=[], boxes=[], head=replace(head, **weights))
    return method(inputs)


@pytest.mark.parametrize("arch,name", CASES)
def test_aid_weights_enter_each_head_term_linearly(arch, name):
    """Instance 0 of image 0 at weight w: every term is L(0) + w (L(1) - L(0)) (so the instance gets w times the
    gradient of weight 1), the instance matters, and the cls weights act on the cls term only (decoupled AID)."""
    d = make_distiller(arch, {name: {}})
    images, targets = make_batch()
    d(images, targets)
    head, method = d.last_inputs.head, d.methods[name]
    assert head.cls_weights is None and head.box_weights is None  # no AID: no weights

    def weights(w):
        return [torch.tensor([w, 1.0, 1.0]), torch.ones(3)]

    for which in ("cls_weights", "box_weights"):
        at = {w: head_terms(method, head, **{which: weights(w)}) for w in (0.0, 0.3, 1.0)}
        plain = head_terms(method, head)
        for term in plain:
            torch.testing.assert_close(at[1.0][term], plain[term], rtol=1e-6, atol=1e-9)
            expected = at[0.0][term] + 0.3 * (at[1.0][term] - at[0.0][term])
            torch.testing.assert_close(at[0.3][term], expected, rtol=1e-5, atol=1e-9, msg=f"{which} {term}")
        moved = [t for t in plain if not torch.isclose(at[0.0][t], at[1.0][t], rtol=1e-6, atol=0)]
        if name == "ld":
            assert moved == (["ld"] if which == "box_weights" else []), (which, moved)
        else:
            assert moved == [which[:3]], f"{which} moved {moved}: cls weights must act on cls only, box on box"


@pytest.mark.parametrize("arch,name", CASES)
def test_batch_repetition_gives_the_same_head_terms(arch, name):
    d = make_distiller(arch, {name: {}}, aid=AIDWeighting("instance", alpha=0.5))
    images, targets = make_batch(1)
    once = {k: v for k, v in d(images, targets).items() if k.startswith("distill/")}
    many = {k: v for k, v in d(images * 3, targets * 3).items() if k.startswith("distill/")}
    assert once.keys() == many.keys() and once
    for k, value in once.items():
        assert float(value) != 0.0
        torch.testing.assert_close(many[k], value, rtol=2e-4, atol=1e-7, msg=k)


def test_location_weights_follow_the_students_assignment_and_decoupled_parts():
    """Each positive location carries its box's weight, background 1; decoupled AID takes exp(-alpha D_cls) for
    classification, exp(-alpha D_box) for boxes, from the teacher's loss split in two."""
    from aidkd.distill import location_weights

    aid = AIDWeighting("instance", alpha=0.7, decoupled=True)
    d = make_distiller("gfl", {"logit_kd": {}}, aid=aid, cache=False)
    images, targets = make_batch()
    d(images, targets)
    head = d.last_inputs.head
    image_list, prepared = prepare_inputs(d.student, images, targets)
    with torch.no_grad():
        parts = teacher_loss_parts(d.teacher.model, image_list, d.teacher.features(image_list), prepared)
    for got, want in ((head.cls_weights, parts["cls"]), (head.box_weights, parts["box"])):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, aid_weights(w, 0.7))
    assert not torch.allclose(head.cls_weights[0], head.box_weights[0])
    loc = location_weights(head.matched, head.box_weights)
    for m, w, iw in zip(head.matched, loc, head.box_weights):
        assert (m >= 0).any()
        torch.testing.assert_close(w[m >= 0], iw[m[m >= 0]])
        assert torch.all(w[m < 0] == 1)


@pytest.mark.parametrize("granularity", ["image", "batch"])
def test_image_and_batch_granularity_weight_every_location_of_an_image_alike(granularity):
    """image: the image's weight on all its locations; batch (the weakening control): the batch's mean instance
    weight on every location of every image -- never the instance weights, background 1."""
    from aidkd.distill import location_weights

    d = make_distiller("gfl", {"logit_kd": {}}, aid=AIDWeighting(granularity, alpha=0.5))
    images, targets = make_batch()
    d(images, targets)
    head, image_w = d.last_inputs.head, d.last_inputs.image_weights
    assert torch.all(image_w < 1)
    if granularity == "batch":
        torch.testing.assert_close(image_w, torch.cat(d.aid.last_instance_weights).mean().expand(len(images)))
    for b, w in enumerate(location_weights(head.matched, head.cls_weights, head.background_weights)):
        torch.testing.assert_close(w, image_w[b].expand_as(w))


def test_the_teacher_loss_cache_stays_exact_with_head_methods():
    """A cache hit (the second step on the same samples) gives the same weights and terms as recomputing."""
    methods = {"logit_kd": {}, "ld": {}}
    aid = AIDWeighting("instance", alpha=0.5, decoupled=True)
    cached, plain = make_distiller("gfl", methods, aid=aid), make_distiller("gfl", methods, aid=aid, cache=False)
    images, targets = make_batch()
    for step in range(2):
        a, b = cached(images, targets), plain(images, targets)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"step {step} {k}")
    assert cached.loss_cache.hits == 2


def test_teacher_head_outputs_have_no_gradient_and_the_teacher_stays_unchanged():
    d = make_distiller("gfl", {"logit_kd": {}, "ld": {}}, aid=AIDWeighting("instance"))
    before = {k: v.clone() for k, v in d.teacher.model.state_dict().items()}
    images, targets = make_batch()
    losses = d(images, targets)
    head = d.last_inputs.head
    assert all(not v.requires_grad for v in head.teacher.values() if torch.is_tensor(v))
    assert head.student["cls_logits"].requires_grad
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.head.parameters())
    after = d.teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not d.teacher.model.training


def test_pairs_that_cannot_be_compared_location_by_location_are_refused():
    with pytest.raises(ValueError, match="anchor"):
        make_distiller("gfl", {"ld": {}}, teacher_kw={"octave_base_scale": 4})
    with pytest.raises(ValueError, match="applies to gfl"):
        make_distiller("retinanet", {"ld": {}})
    with pytest.raises(ValueError, match="granularity"):
        make_distiller("gfl", {"ld": {}}, aid=AIDWeighting("level"))
    torch.manual_seed(0)
    teacher = build_detector("retinanet", "resnet18", 3, min_size=H, max_size=W, fpn_channels=16)
    student = build_detector("fcos", "resnet18", 3, min_size=H, max_size=W, fpn_channels=8)
    with pytest.raises(ValueError, match="the student is a fcos detector, the teacher a retinanet"):
        Distiller(student, teacher, {"logit_kd": {}}, None, sample_shape=(H, W))
    with pytest.raises(ValueError, match="temperature"):
        build_method("ld", 8, 16, 5, temperature=0)


@pytest.mark.parametrize("arch", ["gfl", "retinanet", "fcos"])
@pytest.mark.parametrize("layer", [0, 2, 4])
def test_cross_head_through_an_identical_teacher_gives_the_students_own_predictions(arch, layer):
    """Teacher = a copy of the student: whichever layer the teacher takes over at, the cross-head predictions are
    the student's own, in the same layout (and the cross-head loss is 0 there)."""
    import copy

    torch.manual_seed(0)
    student = build_detector(arch, "resnet18", 3, min_size=H, max_size=W, fpn_channels=8)
    d = Distiller(student, copy.deepcopy(student), {"cross_head": {"layer": layer}}, None,
                  sample_shape=(H, W)).eval()
    images, targets = make_batch()
    losses = d(images, targets)
    head = d.last_inputs.head
    cross = d.methods["cross_head"].cross_outputs(head)
    assert cross.keys() <= head.student.keys() and "cls_logits" in cross
    for key, value in cross.items():
        torch.testing.assert_close(value, head.student[key], rtol=1e-5, atol=1e-5, msg=key)
    assert abs(float(losses["distill/cross_head/cls"])) < 1e-5
    if arch != "fcos":  # FCOS's untrained regression is ReLU-clipped to 0 in places: empty boxes, GIoU loss 1
        assert abs(float(losses["distill/cross_head/box"])) < 1e-5
    # the teacher's first `layer` blocks are not used, its block `layer` is
    from aidkd.distill.head import _head_branches

    method = d.methods["cross_head"]
    for block, used in ((layer - 1, False), (layer, True)):
        if not 0 <= block < 4:
            continue
        conv = next(m for m in _head_branches(arch, d.teacher.model)["cls"][0][block].modules()
                    if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            conv.weight.add_(0.5)
        moved = not torch.allclose(method.cross_outputs(head)["cls_logits"], head.student["cls_logits"], atol=1e-5)
        assert moved is used, f"teacher cls block {block} {'unused' if used else 'used'}"
        with torch.no_grad():
            conv.weight.sub_(0.5)
    with pytest.raises(ValueError, match="layer 5 but the student's cls tower has 4 blocks"):
        Distiller(student, copy.deepcopy(student), {"cross_head": {"layer": 5}}, None, sample_shape=(H, W))


def test_ld_does_not_move_with_resolution():
    """A finer input adds locations away from the boxes (outside the positives and the valuable region): LD, a mean
    over the positives' region normalised by the positives, keeps its value and its gradient."""
    g = torch.Generator().manual_seed(0)
    reg_max = 4

    def inputs(extra: int) -> tuple[HeadInputs, torch.Tensor]:
        near = torch.tensor([[0.0, 0, 16, 16], [4, 0, 20, 16], [8, 0, 24, 16]])
        far = torch.tensor([[100.0, 100, 116, 116]]).repeat(extra, 1) + torch.arange(extra)[:, None] * 20
        anchors = torch.cat([near, far])
        student = torch.cat([base_s, torch.randn(extra, 4 * (reg_max + 1), generator=g)]).requires_grad_(True)
        teacher = torch.cat([base_t, torch.randn(extra, 4 * (reg_max + 1), generator=g)])
        matched = torch.cat([torch.tensor([0, -1, -1]), torch.full((extra,), -1)])
        head = HeadInputs(family="gfl", student={"bbox_regression": student[None], "anchors": [anchors]},
                          teacher={"bbox_regression": teacher[None]}, matched=[matched],
                          targets=[{"boxes": torch.tensor([[0.0, 0, 16, 16]])}], student_model=None,
                          teacher_model=None, images=None, student_features=None, teacher_features=None)
        return head, student

    base_s = torch.randn(3, 4 * (reg_max + 1), generator=g)
    base_t = torch.randn(3, 4 * (reg_max + 1), generator=g)
    method = build_method("ld", 8, 8, 1, vlr_fraction=0.5)
    results = []
    for extra in (1, 12):
        head, leaf = inputs(extra)
        loss = head_terms(method, head)["ld"]
        results.append((loss, torch.autograd.grad(loss, leaf)[0][:3]))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[0][1][1].abs().sum() > 0 and results[0][1][2].abs().sum() == 0  # IoU 0.6 joins, 1/3 does not


def test_valuable_region_adds_near_best_locations_of_a_box():
    anchors = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [5, 0, 15, 10], [30, 30, 40, 40]])
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    matched = torch.tensor([0, -1, -1, -1])
    # IoUs 1, 8/12, 5/15, 0: at fraction 0.5 the second joins, the third (1/3 < 1/2) and the far one do not
    assert valuable_region(anchors, boxes, matched, 0.5).tolist() == [0, 0, -1, -1]
    assert valuable_region(anchors, boxes, matched, 0.3).tolist() == [0, 0, 0, -1]
    assert valuable_region(anchors, boxes[:0], matched, 0.3).tolist() == [0, -1, -1, -1]


CLASSES = ["Car", "Pedestrian", "Cyclist"]


@pytest.fixture
def gfl_teacher_file(tmp_path):
    torch.manual_seed(1)
    teacher = build_detector("gfl", "resnet18", 4, min_size=64, max_size=192, fpn_channels=32)
    return save_model_file(tmp_path / "teacher.pt", teacher, model_meta(teacher, CLASSES, 64, 192, {}))


def test_a_negligible_head_distillation_trains_the_same_student_as_training_alone(tiny_cfg, gfl_teacher_file):
    """ld + logit_kd + cross_head with decoupled AID at loss_scale 1e-30: the same student as training alone (the
    head methods and the teacher's head use no random numbers), and its model file holds the student's keys only
    (cross_head's adapters are in the training checkpoint, not in the model file)."""
    from aidkd.engine.run import train

    common = {"train": {"epochs": 1, "progress_bar": False, "limit_train_batches": 3, "limit_val_batches": 1},
              "data": {"hflip": 0.5}, "model": {"arch": "gfl", "backbone": "resnet18", "fpn_channels": 16}}
    train(config_from_dict(tiny_cfg("alone", **common)))
    train(config_from_dict(tiny_cfg("kd", **common, distill={
        "teacher": {"checkpoint": str(gfl_teacher_file)}, "methods": [{"name": "ld"}, {"name": "logit_kd"}, {"name": "cross_head"}],
        "aid": {"enabled": True, "decoupled": True}, "loss_scale": 1e-30})))
    a = load_detector(Path(tiny_cfg("alone")["output_dir"]) / "model_last.pt")[0].state_dict()
    b = load_detector(Path(tiny_cfg("kd")["output_dir"]) / "model_last.pt")[0].state_dict()
    assert a.keys() == b.keys()
    state = torch.load(Path(tiny_cfg("kd")["output_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("distiller.methods.cross_head.adapters.") for k in state["state_dict"])
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-6, f"the distillation run trained another student (max weight difference {worst:.3g})"
