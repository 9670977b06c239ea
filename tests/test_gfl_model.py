"""GFL detector: torchvision contract, the ops used by distillation, ignore regions, a short overfit."""
import pytest
import torch
from torchvision.ops import box_iou

from aidkd.models import ops
from aidkd.models.gfl import GFL, build_gfl
from aidkd.models.ops.gfl import GFLOps

H, W = 96, 128
NUM_CLASSES = 4  # background + 3 classes


def small_gfl(**kw) -> GFL:
    torch.manual_seed(0)
    kw.setdefault("trainable_backbone_layers", 5)
    return build_gfl("resnet18", NUM_CLASSES, min_size=H, max_size=W, fpn_channels=32, **kw)


def scene(boxes, labels, colours=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0))):
    """A grey image with solid rectangles, one colour per class."""
    img = torch.full((3, H, W), 0.5)
    boxes = torch.tensor(boxes, dtype=torch.float32)
    for b, lab in zip(boxes.long(), labels):
        img[:, b[1] : b[3], b[0] : b[2]] = torch.tensor(colours[lab - 1])[:, None, None]
    return img, {"boxes": boxes, "labels": torch.tensor(labels)}


def two_images():
    img0, t0 = scene([[8, 12, 56, 60], [70, 30, 118, 86]], [1, 2])
    img1, t1 = scene([[30, 20, 60, 90]], [3])
    return [img0, img1], [t0, t1]


def test_structure_and_anchors():
    model = small_gfl()
    assert model.backbone.out_channels == 32
    assert model.head.cls_logits.out_channels == NUM_CLASSES
    assert model.head.bbox_reg.out_channels == 4 * 17  # reg_max 16
    assert len(model.head.scales) == 5
    images, _ = model.transform([torch.zeros(3, H, W)])
    feats = list(ops.extract_features(model, images).values())
    anchors, per_level = model.anchors(images, feats)
    # 96x128 input: P3 12x16, P4 6x8, P5 3x4, P6 2x2, P7 1x1
    assert per_level == [192, 48, 12, 4, 1]
    assert model.feature_strides(images, feats) == [8, 16, 32, 64, 128] == ops.feature_strides(images, feats)
    # one square anchor of 8 strides, centred on (x * stride, y * stride) like MMDetection's GFL
    assert anchors[0][0].tolist() == [-32.0, -32.0, 32.0, 32.0]
    assert anchors[0][1].tolist() == [-24.0, -32.0, 40.0, 32.0]
    assert anchors[0][-1].tolist() == [-512.0, -512.0, 512.0, 512.0]  # the single P7 location
    p6 = anchors[0][192 + 48 + 12 : 192 + 48 + 12 + 4]
    assert p6[1].tolist() == [64 - 256.0, -256.0, 64 + 256.0, 256.0]  # second P6 location: x = 64
    bad = GFL(model.backbone, NUM_CLASSES, min_size=H, max_size=W, anchor_strides=(4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match="anchor_strides"):
        bad.anchors(images, feats)


def test_training_forward_returns_three_finite_losses():
    model = small_gfl()
    model.train()
    images, targets = two_images()
    losses = model(images, targets)
    assert set(losses) == {"loss_qfl", "loss_bbox", "loss_dfl"}
    assert all(torch.isfinite(v) and v.dim() == 0 and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.bbox_reg.weight.grad.abs().sum() > 0 and model.head.cls_logits.weight.grad.abs().sum() > 0


def test_training_without_boxes():
    model = small_gfl()
    model.train()
    losses = model([torch.rand(3, H, W)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_dfl"].item() == 0.0 and losses["loss_qfl"] > 0
    sum(losses.values()).backward()  # the graph stays connected


def test_eval_forward_returns_detections_in_input_pixels():
    model = small_gfl(score_thresh=0.0, detections_per_img=20)
    model.eval()
    # a 120x160 input is resized to 96x128 by the transform and the boxes mapped back
    with torch.no_grad():
        out = model([torch.rand(3, 120, 160), torch.rand(3, H, W)])
    assert isinstance(out, list) and len(out) == 2
    for det, (h, w) in zip(out, [(120, 160), (H, W)]):
        assert set(det) == {"boxes", "scores", "labels"}
        n = det["boxes"].shape[0]
        assert 0 < n <= 20 and det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < NUM_CLASSES
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted, as torchvision's batched_nms returns


def test_a_few_sgd_steps_reduce_the_loss():
    # The reported loss is not monotonic at the start of training, by design (as in MMDetection): loss_bbox/loss_dfl
    # are weighted by the predicted scores and divided by max(sum of weights, 1), so they grow while the scores rise
    # from 0.01; loss_qfl grows while the IoU targets rise. What must fall is the per-positive box loss (GIoU, DFL)
    # and with it the per-box loss (QFL + 2 GIoU + 0.25 DFL averaged over the box's locations).
    model = small_gfl()
    model.train()
    img, target = scene([[8, 12, 56, 60], [70, 30, 118, 86]], [1, 2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    history = []
    for _ in range(6):
        image_list, tt = ops.prepare_inputs(model, [img], [target])
        terms, outputs = GFLOps().loss_terms(model, image_list, ops.extract_features(model, image_list), tt)
        pos = terms.matched_idxs >= 0
        per_box = GFLOps().instance_losses(model, terms, tt, outputs, outputs["anchors"])[0]
        history.append((terms.bbox[pos].mean().item(), terms.dfl[pos].mean().item(), per_box.mean().item()))
        loss = sum(model.reduce_loss_terms(terms).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    (giou0, dfl0, box0), (giou1, dfl1, box1) = history[0], history[-1]
    assert giou1 < giou0 and dfl1 < dfl0 and box1 < box0


def test_ops_losses_match_the_forward_and_teacher_losses_reduce_to_them():
    model = small_gfl()
    model.train()
    images, targets = two_images()
    forward_losses = model(images, targets)
    image_list, tt = ops.prepare_inputs(model, images, targets)
    feats = ops.extract_features(model, image_list)
    losses = ops.detection_losses(model, image_list, feats, tt)
    for k, v in forward_losses.items():
        assert losses[k].item() == pytest.approx(v.item(), rel=1e-5)

    teacher = ops.teacher_losses(model, image_list, feats, tt)
    assert [t.shape for t in teacher.per_instance] == [(2,), (1,)]
    assert all(torch.isfinite(t).all() and (t > 0).all() for t in teacher.per_instance)
    # per level: the detector's loss of each level's positive locations (level AID counts positives only, in every
    # family); with the negatives' QFL it is the total loss
    assert teacher.per_level.shape == (5,)
    negatives_qfl = GFLOps().loss_terms(model, image_list, feats, tt)[0]
    negatives_qfl = negatives_qfl.qfl[negatives_qfl.matched_idxs < 0].sum().item() / max(
        1, int((negatives_qfl.matched_idxs >= 0).sum()))
    assert negatives_qfl > 0
    assert teacher.per_level.sum().item() + negatives_qfl == pytest.approx(sum(v.item() for v in losses.values()),
                                                                           rel=1e-5)

    # Both come from the same per-location terms. Reduced like the detector they give the training loss; reduced
    # per box (mean over its locations of QFL + 2 GIoU + 0.25 DFL) they give the teacher's per-instance losses.
    gfl_ops = GFLOps()
    terms, _ = gfl_ops.loss_terms(model, image_list, feats, tt)
    pos = terms.matched_idxs >= 0
    num_pos = pos.sum().item()
    w = terms.weight
    assert losses["loss_qfl"].item() == pytest.approx(terms.qfl.sum().item() / num_pos, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(2.0 * (w * terms.bbox).sum().item() / max(w.sum().item(), 1))
    assert losses["loss_dfl"].item() == pytest.approx(0.25 * (w * terms.dfl).sum().item() / max(w.sum().item(), 1))
    per_location = terms.qfl + 2.0 * terms.bbox + 0.25 * terms.dfl
    for b, per_box in enumerate(teacher.per_instance):
        for k, value in enumerate(per_box.tolist()):
            mine = terms.matched_idxs[b] == k
            assert mine.sum() > 0
            assert value == pytest.approx(per_location[b][mine].mean().item(), rel=1e-5)
    # the positives' part of QFL is inside the per-instance losses; with the negatives' QFL it gives loss_qfl
    counts = [torch.bincount(terms.matched_idxs[b][pos[b]], minlength=len(t["boxes"])) for b, t in enumerate(tt)]
    instance_sum = sum((per_box * c).sum().item() for per_box, c in zip(teacher.per_instance, counts))
    positive_box_dfl = (2.0 * terms.bbox + 0.25 * terms.dfl)[pos].sum().item()
    negative_qfl = terms.qfl[~pos].sum().item()
    assert (instance_sum - positive_box_dfl + negative_qfl) / num_pos == pytest.approx(losses["loss_qfl"].item(),
                                                                                       rel=1e-4)


def test_teacher_loss_of_a_box_without_assigned_locations_is_finite():
    model = small_gfl()
    model.eval()
    # a 2x2 box between anchor centres (multiples of 8): no candidate centre is inside it, so ATSS assigns nothing
    images = [torch.rand(3, H, W)]
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0], [40.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([1, 2])}]
    image_list, tt = ops.prepare_inputs(model, images, targets)
    feats = ops.extract_features(model, image_list)
    terms, _ = GFLOps().loss_terms(model, image_list, feats, tt)
    assert not (terms.matched_idxs == 0).any() and (terms.matched_idxs == 1).any()
    teacher = ops.teacher_losses(model, image_list, feats, tt)
    assert torch.isfinite(teacher.per_instance[0]).all() and (teacher.per_instance[0] > 0).all()


def test_ignore_boxes_remove_negatives_from_qfl():
    model = small_gfl()
    model.eval()
    img, target = scene([[8, 12, 56, 60]], [1])
    ignored = dict(target, ignore_boxes=torch.tensor([[64.0, 0.0, 128.0, 96.0]]))
    image_list, tt = ops.prepare_inputs(model, [img, img], [target, ignored])
    feats = ops.extract_features(model, image_list)
    terms, _ = GFLOps().loss_terms(model, image_list, feats, tt)
    plain, masked = terms.matched_idxs
    assert (plain == -2).sum() == 0 and (masked == -2).sum() > 0
    assert (plain >= 0).tolist() == (masked >= 0).tolist()  # positives unchanged
    assert (masked == -1).sum() == (plain == -1).sum() - (masked == -2).sum()  # fewer negatives
    assert (terms.qfl[1][masked == -2] == 0).all()
    assert terms.qfl[1].sum() < terms.qfl[0].sum()
    # the model's own forward applies them as well (and rescales them with the image)
    model.train()
    with torch.no_grad():
        plain_loss = model([img], [target])["loss_qfl"]
        ignored_loss = model([img], [ignored])["loss_qfl"]
    assert ignored_loss < plain_loss


def test_overfit_two_images():
    """GFL-R18 (FPN 32) learns two synthetic images (a red class-1 box, a blue class-2 box) in 60 Adam steps.

    One image per step: the box/DFL losses are weighted by the predicted score and normalised over the batch, so in a
    from-scratch batch one box that takes off first can starve the others of regression gradient for a long while
    (an early-training property of GFL's weighting, not a bug); alternating images keeps this test short and stable.
    """
    model = small_gfl()
    model.train()
    data = [scene([[8, 12, 56, 60]], [1]), scene([[50, 24, 110, 84]], [2])]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(60):
        img, target = data[step % 2]
        loss = sum(model([img], [target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        detections = model([img for img, _ in data])
    for det, (_, target) in zip(detections, data):
        overlap = box_iou(det["boxes"], target["boxes"])[:, 0]
        label = target["labels"][0]
        right = (overlap > 0.7) & (det["labels"] == label)
        wrong = (overlap > 0.5) & (det["labels"] != label)
        assert right.any() and det["scores"][right].max() > 0.7
        assert not wrong.any() or det["scores"][wrong].max() < 0.5


def test_level_teacher_loss_counts_positives_only_like_the_other_families():
    """Level AID is alike in every family: per_level holds the positives' loss only. Images without boxes have no
    positives, so GFL's per_level is 0 there, as RetinaNet's, FCOS's and Faster R-CNN's (it held the negatives'
    QFL before)."""
    model = small_gfl()
    model.eval()
    images, _ = two_images()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    image_list, tt = ops.prepare_inputs(model, images, empty)
    feats = ops.extract_features(model, image_list)
    teacher = ops.teacher_losses(model, image_list, feats, tt)
    assert float(teacher.per_level.abs().sum()) == 0.0
    assert sum(v.item() for v in ops.detection_losses(model, image_list, feats, tt).values()) > 0
