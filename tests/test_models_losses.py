"""aidkd.models.ops: losses equal torchvision's, teacher losses are the detector's own loss per instance."""
from __future__ import annotations

import pytest
import torch

from aidkd.models import build_detector, ops
from aidkd.models.ops.fcos import FCOSOps
from aidkd.models.ops.rcnn import FasterRCNNOps
from aidkd.models.ops.retinanet import RetinaNetOps

H, W = 96, 128
ARCHS = ["retinanet", "fcos", "fasterrcnn"]


def make_batch(with_ignore: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=g), torch.rand(3, H, W, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0], [5.0, 70.0, 22.0, 88.0]]),
         "labels": torch.tensor([1, 2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    if with_ignore:
        targets[0]["ignore_boxes"] = torch.tensor([[70.0, 0.0, 128.0, 16.0], [0.0, 0.0, 8.0, 8.0]])
        targets[1]["ignore_boxes"] = torch.tensor([[20.0, 20.0, 90.0, 80.0]])
    return images, targets


def make_model(arch: str, seed: int = 1):
    torch.manual_seed(seed)
    return build_detector(arch, "resnet18", 3, min_size=H, max_size=W, fpn_channels=32)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return make_model(request.param)


def rel_close(a, b, tol=1e-5):
    a, b = float(a), float(b)
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-8)


def test_detection_losses_equal_torchvision(model):
    model.train()
    images, targets = make_batch()
    torch.manual_seed(123)
    ref = model(images, targets)
    torch.manual_seed(123)  # Faster R-CNN samples anchors and RoIs: same RNG stream, same samples
    il, tt = ops.prepare_inputs(model, images, targets)
    feats = ops.extract_features(model, il)
    mine = ops.detection_losses(model, il, feats, tt)
    assert set(mine) == set(ref)
    for k in ref:
        assert rel_close(mine[k], ref[k]), (k, float(mine[k]), float(ref[k]))
    total = sum(mine.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_head_outputs_reuse(model):
    model.train()
    images, targets = make_batch()
    il, tt = ops.prepare_inputs(model, images, targets)
    feats = ops.extract_features(model, il)
    out = ops.head_outputs(model, il, feats)
    torch.manual_seed(3)
    a = ops.detection_losses(model, il, feats, tt, outputs=out)
    torch.manual_seed(3)
    b = ops.detection_losses(model, il, feats, tt)
    for k in a:
        assert rel_close(a[k], b[k])


def test_teacher_losses_shape_and_sign(model):
    model.eval()
    images, targets = make_batch()
    il, tt = ops.prepare_inputs(model, images, targets)
    feats = ops.extract_features(model, il)
    tl = ops.teacher_losses(model, il, feats, tt)
    assert isinstance(tl, ops.TeacherLosses)
    assert [p.shape for p in tl.per_instance] == [(3,), (0,)]
    for p in tl.per_instance:
        assert torch.isfinite(p).all() and (p >= 0).all() and not p.requires_grad
    assert tl.per_level.shape == (len(feats),)
    assert torch.isfinite(tl.per_level).all() and (tl.per_level >= 0).all()
    # deterministic: no sampling in the teacher path
    tl2 = ops.teacher_losses(model, il, feats, tt)
    assert torch.allclose(tl.per_instance[0], tl2.per_instance[0])


def test_edge_cases_empty_batch_duplicates_tiny_boxes(model):
    model.eval()
    images, _ = make_batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    il, tt = ops.prepare_inputs(model, images, empty)
    feats = ops.extract_features(model, il)
    tl = ops.teacher_losses(model, il, feats, tt)
    assert [p.shape for p in tl.per_instance] == [(0,), (0,)] and float(tl.per_level.abs().sum()) == 0.0
    assert all(torch.isfinite(v) for v in ops.detection_losses(model, il, feats, tt).values())
    # a 2-px box (no FCOS location, no good anchor) and an exact duplicate (its anchors/RoIs go to the first copy)
    odd = [{"boxes": torch.tensor([[40.0, 40.0, 42.0, 42.0], [10.0, 10.0, 60.0, 60.0], [10.0, 10.0, 60.0, 60.0]]),
            "labels": torch.tensor([1, 2, 2])}] * 2
    il, tt = ops.prepare_inputs(model, images, odd)
    tl = ops.teacher_losses(model, il, feats, tt)
    for p in tl.per_instance:
        assert p.shape == (3,) and torch.isfinite(p).all() and (p > 0).all()


def _bias_towards_class1(model):
    """Make the (untrained) detector confidently predict class 1 everywhere."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            b = model.roi_heads.box_predictor.cls_score.bias
            b.zero_()
            b[1] = 6.0
        else:
            layer = model.head.classification_head.cls_logits
            k = model.head.classification_head.num_classes
            bias = layer.bias.view(-1, k)
            bias.fill_(-6.0)
            bias[:, 1] = 6.0


def test_better_predicted_instance_gets_lower_loss(model):
    m = make_model(_arch_of(model), seed=2)
    _bias_towards_class1(m)
    m.eval()
    images, targets = make_batch()
    il, tt = ops.prepare_inputs(m, images, targets)
    feats = ops.extract_features(m, il)
    right = ops.teacher_losses(m, il, feats, tt).per_instance[0]  # labels 1, 2, 1
    swapped = [dict(tt[0], labels=torch.tensor([2, 1, 2])), tt[1]]
    wrong = ops.teacher_losses(m, il, feats, swapped).per_instance[0]
    assert right[0] < wrong[0] and right[2] < wrong[2]  # class-1 boxes: predicted right only with label 1
    assert right[1] > wrong[1]  # box 1 is labelled 2 in the original targets


def _arch_of(model):
    return {"RetinaNet": "retinanet", "FCOS": "fcos", "FasterRCNN": "fasterrcnn"}[type(model).__name__]


def test_overfitting_lowers_teacher_losses():
    m = make_model("retinanet", seed=4)
    images, targets = make_batch()
    images, targets = images[:1], targets[:1]
    m.eval()
    il, tt = ops.prepare_inputs(m, images, targets)
    before = ops.teacher_losses(m, il, ops.extract_features(m, il), tt).per_instance[0]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    m.train()
    for _ in range(8):
        il, tt = ops.prepare_inputs(m, images, targets)
        loss = sum(ops.detection_losses(m, il, ops.extract_features(m, il), tt).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    il, tt = ops.prepare_inputs(m, images, targets)
    after = ops.teacher_losses(m, il, ops.extract_features(m, il), tt).per_instance[0]
    assert after.mean() < before.mean()


# ---------------------------------------------------------------------------------------------- reductions
def _prep(model, with_ignore=False):
    images, targets = make_batch(with_ignore)
    il, tt = ops.prepare_inputs(model, images, targets)
    return il, tt, ops.extract_features(model, il)


def test_retinanet_instances_reduce_to_torchvision_loss():
    m = make_model("retinanet")
    m.train()
    images, targets = make_batch()
    ref = m(images, targets)
    il, tt, feats = _prep(m)
    fam = RetinaNetOps()
    terms, _ = fam.loss_terms(m, il, feats, tt)
    tl = fam.teacher_losses(m, il, feats, tt)
    per_image = []
    for i, (t, mi) in enumerate(zip(tt, terms.matched_idxs)):
        n = t["boxes"].shape[0]
        counts = torch.bincount(mi[mi >= 0], minlength=n)
        assert (counts > 0).all()  # allow_low_quality_matches gives every box an anchor here
        negatives = terms.cls[i][mi == -1].sum()  # focal terms of the background anchors
        nfg = max(1, int((mi >= 0).sum()))
        per_image.append(((tl.per_instance[i] * counts).sum() + negatives) / nfg)
    total = sum(per_image) / len(per_image)
    assert rel_close(total, ref["classification"] + ref["bbox_regression"])
    # per level: positives only, normalised per image like the detector, averaged over images
    positive_part = sum((tl.per_instance[i] * torch.bincount(mi[mi >= 0], minlength=len(tl.per_instance[i]))).sum()
                        / max(1, int((mi >= 0).sum())) for i, mi in enumerate(terms.matched_idxs)) / len(tt)
    assert rel_close(tl.per_level.sum(), positive_part)


def test_fcos_instances_reduce_to_torchvision_loss():
    m = make_model("fcos")
    m.train()
    images, targets = make_batch()
    ref = m(images, targets)
    il, tt, feats = _prep(m)
    fam = FCOSOps()
    terms, _ = fam.loss_terms(m, il, feats, tt)
    tl = fam.teacher_losses(m, il, feats, tt)
    nfg = max(1, sum(int((mi >= 0).sum()) for mi in terms.matched_idxs))
    acc = 0.0
    pos_part = 0.0
    for i, (t, mi) in enumerate(zip(tt, terms.matched_idxs)):
        counts = torch.bincount(mi[mi >= 0], minlength=t["boxes"].shape[0])
        pos = (tl.per_instance[i] * counts).sum()
        acc = acc + pos + terms.cls[i][mi == -1].sum()
        pos_part = pos_part + pos
    assert rel_close(acc / nfg, sum(ref.values()))
    assert rel_close(tl.per_level.sum(), pos_part / nfg)


def test_fcos_box_without_location_gets_fallback():
    m = make_model("fcos")
    m.eval()
    images, _ = make_batch()
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 43.0, 43.0], [10.0, 12.0, 50.0, 60.0]]),
                "labels": torch.tensor([1, 2])}] * 2  # a 3-px box: no location inside it
    il, tt = ops.prepare_inputs(m, images, targets)
    feats = ops.extract_features(m, il)
    fam = FCOSOps()
    terms, _ = fam.loss_terms(m, il, feats, tt)
    assert not (terms.matched_idxs[0] == 0).any()
    tl = ops.teacher_losses(m, il, feats, tt)
    assert torch.isfinite(tl.per_instance[0]).all() and (tl.per_instance[0] > 0).all()


def test_fasterrcnn_terms_reduce_to_torchvision_loss():
    m = make_model("fasterrcnn")
    m.train()
    images, targets = make_batch()
    torch.manual_seed(7)
    ref = m(images, targets)
    torch.manual_seed(7)
    il, tt, feats = _prep(m)
    fam = FasterRCNNOps()
    out = fam.head_outputs(m, il, feats)
    rpn = fam.rpn_terms(m, out, tt, sample=True)
    roi = fam.roi_terms(m, il, feats, out["proposals"], tt, sample=True)
    n_rpn = sum(int(s.sum()) for s in rpn.sampled)
    obj = sum(o[s].sum() for o, s in zip(rpn.objectness, rpn.sampled)) / n_rpn
    rbox = sum(b[s].sum() for b, s in zip(rpn.box, rpn.sampled)) / n_rpn
    n_roi = sum(len(c) for c in roi.cls)
    cls = sum(c.sum() for c in roi.cls) / n_roi
    box = sum(b.sum() for b in roi.box) / n_roi
    assert rel_close(obj, ref["loss_objectness"]) and rel_close(rbox, ref["loss_rpn_box_reg"])
    assert rel_close(cls, ref["loss_classifier"]) and rel_close(box, ref["loss_box_reg"])

    # teacher: per box = mean over its RPN anchors + mean over its positive RoIs (all of them, no sampling)
    m.eval()
    il, tt, feats = _prep(m)
    out = fam.head_outputs(m, il, feats)
    tl = fam.teacher_losses(m, il, feats, tt, out)
    rpn = fam.rpn_terms(m, out, tt, sample=False)
    roi = fam.roi_terms(m, il, feats, out["proposals"], tt, sample=False)
    for k in range(3):
        a = rpn.matched_idxs[0] == k
        r = (roi.labels[0] > 0) & (roi.matched_idxs[0] == k)
        assert a.any() and r.any()
        expect = (rpn.objectness[0] + rpn.box[0])[a].mean() + (roi.cls[0] + roi.box[0])[r].mean()
        assert rel_close(tl.per_instance[0][k], expect)
    pos = rpn.matched_idxs[0] >= 0
    rpn_mean = (rpn.objectness[0] + rpn.box[0])[pos].mean()
    roi_mean = (roi.cls[0] + roi.box[0]).mean()
    assert rel_close(tl.per_level.sum(), rpn_mean + len(feats) * roi_mean)


# ---------------------------------------------------------------------------------------------- ignore regions
def _retina_like_counts(fam, m, il, tt, feats):
    terms, _ = fam.loss_terms(m, il, feats, tt)
    return [(int((x >= 0).sum()), int((x == -1).sum()), int((x == -2).sum())) for x in terms.matched_idxs], terms


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_ignore_boxes_remove_negatives_one_stage(arch):
    m = make_model(arch)
    m.train()
    fam = RetinaNetOps() if arch == "retinanet" else FCOSOps()
    il, tt, feats = _prep(m, with_ignore=False)
    plain, plain_terms = _retina_like_counts(fam, m, il, tt, feats)
    il, tt_ign, feats = _prep(m, with_ignore=True)
    ign, ign_terms = _retina_like_counts(fam, m, il, tt_ign, feats)
    for (p0, n0, i0), (p1, n1, i1) in zip(plain, ign):
        assert p1 == p0  # positives untouched
        assert n1 < n0 and i1 - i0 == n0 - n1  # negatives became ignored
    # exactly the background anchors whose centre is inside an ignore box
    anchors = ops.head_outputs(m, il, feats)["anchors"][1]
    inside = ops.centres_in_boxes(ops.box_centres(anchors), tt_ign[1]["ignore_boxes"])
    assert torch.equal(ign_terms.matched_idxs[1] == -2, inside)
    assert float(ign_terms.cls[1][inside].abs().sum()) == 0.0
    a = fam.reduce(plain_terms)["classification"]
    b = ops.detection_losses(m, il, feats, tt_ign)["classification"]
    assert b < a


def test_ignore_boxes_remove_negatives_fasterrcnn():
    m = make_model("fasterrcnn")
    m.train()
    fam = FasterRCNNOps()
    counts = {}
    for flag in (False, True):
        il, tt, feats = _prep(m, with_ignore=flag)
        out = fam.head_outputs(m, il, feats)
        rpn = fam.rpn_terms(m, out, tt, sample=False)
        roi = fam.roi_terms(m, il, feats, out["proposals"], tt, sample=True)
        counts[flag] = [(int((lab == 1).sum()), int((lab == 0).sum())) for lab in rpn.labels]
        assert all((lab >= 0).all() for lab in roi.labels)  # ignored RoIs are never sampled
    for (p0, n0), (p1, n1) in zip(counts[False], counts[True]):
        assert p1 == p0 and n1 < n0
    # RoI level: count background proposals centred in ignore boxes before sampling
    il, tt, feats = _prep(m, with_ignore=True)
    out = fam.head_outputs(m, il, feats)
    props = out["proposals"][1]
    inside = ops.centres_in_boxes(ops.box_centres(props), tt[1]["ignore_boxes"])
    assert inside.any()
    torch.manual_seed(0)
    roi = fam.roi_terms(m, il, feats, out["proposals"], tt, sample=True)
    kept = roi.proposals[1]
    assert not ops.centres_in_boxes(ops.box_centres(kept), tt[1]["ignore_boxes"]).any()


def test_prepare_inputs_rescales_ignore_boxes():
    m = make_model("retinanet")
    m.eval()
    images = [torch.rand(3, H // 2, W // 2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1]),
                "ignore_boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0]])}]
    il, tt = ops.prepare_inputs(m, images, targets)
    assert il.image_sizes[0] == (H, W)
    assert torch.allclose(tt[0]["boxes"], torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    assert torch.allclose(tt[0]["ignore_boxes"], torch.tensor([[20.0, 20.0, 60.0, 80.0]]))
    assert torch.equal(targets[0]["ignore_boxes"], torch.tensor([[10.0, 10.0, 30.0, 40.0]]))  # input untouched


# ---------------------------------------------------------------------------------------------- predict / misc
def test_predict_matches_torchvision_eval(model):
    model.eval()
    images, _ = make_batch()
    with torch.no_grad():
        ref = model(images)
        il, _ = ops.prepare_inputs(model, images)
        feats = ops.extract_features(model, il)
        mine = ops.predict(model, il, feats)
    assert len(mine) == 2
    for a, b in zip(mine, ref):
        assert set(a) == {"boxes", "scores", "labels"}
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.equal(a["labels"], b["labels"])


def test_feature_strides_and_dispatch_errors(model):
    il, _ = ops.prepare_inputs(model.eval(), make_batch()[0])
    feats = ops.extract_features(model, il)
    strides = ops.feature_strides(il, feats)
    assert strides == ([4, 8, 16, 32, 64] if _arch_of(model) == "fasterrcnn" else [8, 16, 32, 64, 128])
    with pytest.raises(TypeError, match="no detector ops registered"):
        ops.get_ops(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="positive width"):
        ops.detection_losses(model, il, feats, [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]),
                                                 "labels": torch.tensor([1])}] * 2)


def test_register_family_subclass_dispatch():
    from torchvision.models.detection import RetinaNet

    class MyRetina(RetinaNet):
        pass

    class MyOps(RetinaNetOps):
        family = "mine"

    m = make_model("retinanet")
    m.__class__ = MyRetina
    assert isinstance(ops.get_ops(m), RetinaNetOps)  # inherits the RetinaNet ops
    ops.register_family(MyRetina, MyOps())
    try:
        assert ops.get_ops(m).family == "mine"
    finally:
        ops._REGISTRY.pop(MyRetina)


def _unassigned_boxes(arch, m, il, feats, tt) -> dict[str, set[int]]:
    """Boxes of image 0 that the family's own matcher gave no anchor / location ("first stage") and, for Faster
    R-CNN, no positive RoI ("roi"): the ones its teacher losses score by the fallback."""
    n = tt[0]["boxes"].shape[0]
    if arch == "fasterrcnn":
        fam = FasterRCNNOps()
        out = fam.head_outputs(m, il, feats)
        matched = fam.rpn_terms(m, out, tt, sample=False).matched_idxs[0]
        roi = fam.roi_terms(m, il, feats, out["proposals"], tt, sample=False)
        roi_fallback = {int(k) for k in roi.matched_idxs[0][~roi.sampled[0]]}  # ground-truth RoIs appended
    else:
        matched = ops.get_ops(m).loss_terms(m, il, feats, tt)[0].matched_idxs[0]
        roi_fallback = set()
    return {"first stage": set(range(n)) - {int(k) for k in matched[matched >= 0]}, "roi": roi_fallback}


@pytest.mark.parametrize("arch", ["gfl", *ARCHS])
def test_teacher_loss_parts_sum_to_per_instance(arch):
    """`aidkd analyze`'s cls / box split: both parts >= 0 and summing to the per-instance loss, also for a box no
    anchor / location is assigned to (the 2x2 px one) and an exact duplicate (its anchors / locations / RoIs go to
    the first copy), both scored by the fallback."""
    m = make_model(arch).eval()
    images, targets = make_batch()
    boxes = targets[0]["boxes"]
    targets[0] = {"boxes": torch.cat([boxes, torch.tensor([[100.0, 5.0, 102.0, 7.0]]), boxes[:1]]),
                  "labels": torch.tensor([1, 2, 1, 2, 1])}
    il, tt = ops.prepare_inputs(m, images, targets)
    feats = ops.extract_features(m, il)
    total = ops.teacher_losses(m, il, feats, tt).per_instance
    parts = ops.teacher_loss_parts(m, il, feats, tt)
    assert set(parts) == {"cls", "box"}
    assert [p.shape for p in parts["cls"]] == [p.shape for p in parts["box"]] == [(5,), (0,)]
    for c, b, t in zip(parts["cls"], parts["box"], total):
        assert (c >= 0).all() and (b >= 0).all() and not c.requires_grad
        assert torch.allclose(c + b, t, rtol=1e-5, atol=1e-6)
    unassigned = _unassigned_boxes(arch, m, il, feats, tt)
    assert unassigned["first stage"] & {3, 4}  # the fallback path is exercised
    if arch == "fasterrcnn":
        assert 4 in unassigned["roi"]  # the duplicate got its own ground-truth RoI
    for k in unassigned["first stage"] | unassigned["roi"]:
        assert float(parts["cls"][0][k]) > 0 and float(parts["box"][0][k]) > 0  # the fallback filled both parts
    # passing the head outputs gives the same parts (`aidkd analyze` runs the head once)
    again = ops.teacher_loss_parts(m, il, feats, tt, outputs=ops.head_outputs(m, il, feats))
    assert all(torch.equal(a, b) for k in parts for a, b in zip(parts[k], again[k]))


def test_teacher_loss_parts_not_provided_says_so():
    """A family registered without the split says so (`aidkd analyze` then leaves the cls / box columns empty)."""
    m = make_model("retinanet").eval()
    images, targets = make_batch()
    il, tt = ops.prepare_inputs(m, images, targets)
    with pytest.raises(NotImplementedError, match="cls / box parts"):
        ops.DetectorOps().teacher_loss_parts(m, il, ops.extract_features(m, il), tt)
