"""One assignment per step: the student's anchors / locations are assigned to the boxes once and reused by the
teacher's AID losses and the head methods when both detectors assign alike (same family, anchors and assigner).
The losses are those of assigning separately, to the bit; a teacher that assigns differently keeps its own."""
import pytest
import torch
from test_distill_head import H, W, make_batch, make_distiller

from aidkd.distill import AIDWeighting
from aidkd.models import build_detector
from aidkd.models.atss import ATSSAssigner
from aidkd.models.ops import same_assignment
from tests.conftest import OpCounter


def _losses(d, images, targets, share):
    d.shares_assignment = share
    torch.manual_seed(1)
    with OpCounter() as count:
        out = d(images, targets)
    return {k: v.detach() for k, v in out.items()}, count.ops


@pytest.mark.parametrize("arch", ["gfl", "retinanet", "fcos"])
@pytest.mark.parametrize("methods", [{"attention": {}}, {"logit_kd": {}}], ids=["feature", "head"])
@pytest.mark.parametrize("cache", [False, True])
def test_shared_assignment_gives_the_same_losses_with_fewer_ops(arch, methods, cache):
    d = make_distiller(arch, methods, AIDWeighting("instance"), cache=cache)
    assert d.shares_assignment
    images, targets = make_batch(n=3)
    targets[2] = {**targets[2], "boxes": targets[2]["boxes"][:0], "labels": targets[2]["labels"][:0]}  # no boxes
    separate, ops_separate = _losses(d, images, targets, False)
    if cache:
        d.loss_cache.clear()
    shared, ops_shared = _losses(d, images, targets, True)
    assert separate.keys() == shared.keys()
    for k in separate:
        assert torch.equal(separate[k], shared[k]), k
    assert ops_shared < ops_separate - 50, (ops_shared, ops_separate)  # the teacher's assignment is not run


def test_detectors_that_assign_differently_do_not_share():
    kw = {"min_size": H, "max_size": W, "fpn_channels": 8}
    gfl = build_detector("gfl", "resnet18", 3, **kw)
    assert same_assignment(gfl, build_detector("gfl", "resnet50", 3, min_size=H, max_size=W, fpn_channels=16))
    other_topk = build_detector("gfl", "resnet18", 3, **kw)
    other_topk.assigner = ATSSAssigner(topk=5)
    assert not same_assignment(gfl, other_topk)
    assert not same_assignment(gfl, build_detector("retinanet", "resnet18", 3, **kw))
    retina = build_detector("retinanet", "resnet18", 3, **kw)
    strict = build_detector("retinanet", "resnet18", 3, **kw)
    strict.proposal_matcher.high_threshold = 0.6
    assert same_assignment(retina, build_detector("retinanet", "resnet18", 3, **kw))
    assert not same_assignment(retina, strict)
    fcos, wide = build_detector("fcos", "resnet18", 3, **kw), build_detector("fcos", "resnet18", 3, **kw)
    wide.center_sampling_radius = 2.5
    assert not same_assignment(fcos, wide)
    rcnn = build_detector("fasterrcnn", "resnet18", 3, **kw)
    assert not same_assignment(rcnn, build_detector("fasterrcnn", "resnet18", 3, **kw))  # no dense assignment


def test_a_teacher_with_other_settings_assigns_on_its_own():
    d = make_distiller("gfl", {"attention": {}}, AIDWeighting("instance"), cache=False)
    d.teacher.model.assigner = ATSSAssigner(topk=3)
    d.shares_assignment = same_assignment(d.student, d.teacher.model)
    assert not d.shares_assignment
    images, targets = make_batch()
    d(images, targets)  # runs: the teacher's losses use its own assignment
    own, _ = d._teacher_losses(*_prepared(d, images, targets))
    d.teacher.model.assigner = ATSSAssigner(topk=9)
    nine, _ = d._teacher_losses(*_prepared(d, images, targets))
    assert any(not torch.equal(a, b) for a, b in zip(own, nine))  # topk matters here, so sharing would be wrong


def _prepared(d, images, targets):
    from aidkd.models.ops import prepare_inputs

    image_list, prepared = prepare_inputs(d.student, images, targets)
    return image_list, d.teacher.features(image_list), prepared
