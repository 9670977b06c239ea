"""aidkd.models.build_detector: architectures x backbones, options, weight loading."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from aidkd.models import build_detector, ops, save_checkpoint

H, W = 96, 128


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_levels_and_eval_output(arch, backbone):
    torch.manual_seed(0)
    m = build_detector(arch, backbone, 4, min_size=H, max_size=W, fpn_channels=32).eval()
    assert m.aidkd_meta == {"arch": arch, "backbone": backbone, "num_classes": 4, "fpn_channels": 32,
                            "frozen_bn": False}
    images = [torch.rand(3, H, W), torch.rand(3, H, W)]
    il, _ = ops.prepare_inputs(m, images)
    feats = ops.extract_features(m, il)
    assert len(feats) == 5 and all(f.shape[1] == 32 for f in feats.values())
    strides = ops.feature_strides(il, feats)
    assert strides == ([4, 8, 16, 32, 64] if arch == "fasterrcnn" else [8, 16, 32, 64, 128])
    with torch.no_grad():
        out = m(images)
    assert len(out) == 2
    for d in out:
        assert set(d) >= {"boxes", "scores", "labels"}
        assert d["boxes"].shape[-1] == 4 and d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0]


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="retinanet, fcos, fasterrcnn, gfl"):
        build_detector("yolo", "resnet18", 3)
    with pytest.raises(ValueError, match="resnet18.*mobilenet_v3_small"):
        build_detector("retinanet", "vgg16", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("retinanet", "resnet18", 1)
    with pytest.raises(ValueError, match="unknown retinanet option.*score_treshold.*score_thresh"):
        build_detector("retinanet", "resnet18", 3, fpn_channels=32, score_treshold=0.1)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        build_detector("fcos", "resnet18", 3, fpn_channels=32, trainable_backbone_layers=7)


def test_options_reach_the_detector():
    m = build_detector("retinanet", "resnet18", 3, min_size=H, max_size=W, fpn_channels=32, score_thresh=0.3,
                       bbox_loss="giou", frozen_bn=True, trainable_backbone_layers=1)
    assert m.score_thresh == 0.3 and m.head.regression_head._loss_type == "giou"
    assert any(isinstance(mod, FrozenBatchNorm2d) for mod in m.backbone.modules())
    trainable = {n.split(".")[0] for n, p in m.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    assert m.transform.min_size == (H,) and m.transform.max_size == W
    f = build_detector("fasterrcnn", "resnet18", 3, fpn_channels=32, rpn_batch_size_per_image=64)
    assert f.rpn.fg_bg_sampler.batch_size_per_image == 64
    # FCOS's GroupNorm(32) needs a multiple of 32; other widths get gcd(32, width) groups
    g = build_detector("fcos", "resnet18", 3, fpn_channels=48)
    assert g.head.classification_head.conv[1].num_groups == 16


def test_local_weights_roundtrip_and_prefixes(tmp_path):
    torch.manual_seed(0)
    src = build_detector("fcos", "resnet18", 3, min_size=H, max_size=W, fpn_channels=32)
    state = src.state_dict()
    # plain state dict
    save_checkpoint(tmp_path / "plain.pt", state)
    # aidkd model file with meta
    save_checkpoint(tmp_path / "model.pt", {"format": "aidkd-model/1", "state_dict": state, "meta": src.aidkd_meta})
    # Lightning checkpoint of a distillation run: student under a prefix, teacher/adapters beside it
    lightning = {f"distiller.student.{k}": v for k, v in state.items()}
    lightning["distiller.methods.am.adapter.weight"] = torch.ones(1)
    save_checkpoint(tmp_path / "run.ckpt", {"state_dict": lightning, "aidkd_meta": src.aidkd_meta, "epoch": 1})
    for name in ("plain.pt", "model.pt", "run.ckpt"):
        torch.manual_seed(99)
        dst = build_detector("fcos", "resnet18", 3, min_size=H, max_size=W, fpn_channels=32,
                             weights=tmp_path / name)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
        assert dst.aidkd_meta["frozen_bn"] is False  # trainable BN followed from the checkpoint


def test_local_weights_mismatch_errors(tmp_path):
    src = build_detector("retinanet", "resnet18", 3, fpn_channels=32)
    save_checkpoint(tmp_path / "model.pt", {"state_dict": src.state_dict(), "meta": src.aidkd_meta})
    with pytest.raises(ValueError, match=r"model.pt: checkpoint is not compatible .*2 classes \(\+ background\) in the checkpoint, 4 expected"):
        build_detector("retinanet", "resnet18", 5, fpn_channels=32, weights=tmp_path / "model.pt")
    save_checkpoint(tmp_path / "plain.pt", src.state_dict())
    with pytest.raises(ValueError, match="shape mismatches"):
        build_detector("retinanet", "resnet18", 5, fpn_channels=32, weights=tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="do not fit"):
        build_detector("fcos", "resnet18", 3, fpn_channels=32, weights=tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        build_detector("retinanet", "resnet18", 3, fpn_channels=32, weights=tmp_path / "nope.pt")


@pytest.mark.parametrize("arch", ["gfl", "fasterrcnn", "retinanet"])
def test_new_classes_loads_all_but_the_class_layers(tmp_path, arch, caplog):
    """Fine-tuning on another class set (e.g. COCO weights for KITTI): only the class-dependent outputs start fresh."""
    torch.manual_seed(0)
    src = build_detector(arch, "resnet18", 4, min_size=H, max_size=W, fpn_channels=16)
    save_checkpoint(tmp_path / "model.pt", {"state_dict": src.state_dict(), "meta": src.aidkd_meta})
    torch.manual_seed(1)
    fresh = build_detector(arch, "resnet18", 12, min_size=H, max_size=W, fpn_channels=16).state_dict()
    torch.manual_seed(1)
    with caplog.at_level("WARNING", logger="aidkd.models.weights"):
        dst = build_detector(arch, "resnet18", 12, min_size=H, max_size=W, fpn_channels=16,
                             weights=tmp_path / "model.pt", new_classes=True)
    old = src.state_dict()
    skipped = {k for k, v in dst.state_dict().items() if v.shape != old[k].shape}
    assert skipped and len(skipped) <= 4  # the classifier's weight and bias (two-stage: + the box predictor's)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, fresh[k] if k in skipped else old[k]), k
    assert all(k in caplog.text for k in skipped)
    assert dst.aidkd_meta["num_classes"] == 12
    # another width is still an error: only the output size of a layer may differ
    with pytest.raises(ValueError, match="fpn_channels"):
        build_detector(arch, "resnet18", 12, fpn_channels=32, weights=tmp_path / "model.pt", new_classes=True)
    save_checkpoint(tmp_path / "plain.pt", src.state_dict())  # no meta: the shapes themselves must tell
    with pytest.raises(ValueError, match="shape mismatches"):
        build_detector(arch, "resnet18", 12, fpn_channels=32, weights=tmp_path / "plain.pt", new_classes=True)


def test_torchvision_enum_checked_before_download():
    with pytest.raises(ValueError, match=r"90 classes \(\+ background\), the detector 3"):
        build_detector("retinanet", "resnet50", 4, weights="RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(ValueError, match="different detector"):
        build_detector("fcos", "resnet50", 91, weights="RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(ValueError, match="fpn_channels=256"):
        build_detector("retinanet", "resnet50", 91, fpn_channels=64, weights="RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(ValueError, match="neither an existing file nor a torchvision weight enum"):
        build_detector("retinanet", "resnet50", 91, weights="NoSuch_Weights.X")
