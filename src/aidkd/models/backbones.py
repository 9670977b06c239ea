"""FPN backbones built from torchvision parts, with a configurable FPN width.

torchvision's own helpers fix the FPN at 256 channels; small CPU students and demos want fewer, so the backbone is
assembled here from the same public pieces (`BackboneWithFPN`, `FeaturePyramidNetwork` extra blocks).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models import (
    get_weight,
    mobilenet_v3_large,
    mobilenet_v3_small,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from aidkd.models.weights import read_weights

RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101}
MOBILENETS = {"mobilenet_v3_large": mobilenet_v3_large, "mobilenet_v3_small": mobilenet_v3_small}
BACKBONES = tuple(RESNETS) + tuple(MOBILENETS)


def load_backbone_weights(net: nn.Module, weights: str | Path | None) -> None:
    """Load ImageNet weights into a classification trunk.

    ``weights`` is a local file (a torchvision state dict, loaded with ``weights_only=True``) or a torchvision
    weight enum name such as ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloads: needs internet).
    """
    if weights is None:
        return
    path = Path(str(weights))
    if path.suffix in {".pth", ".pt", ".bin", ".safetensors"} or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        state = read_weights(path).state  # the one reader: weights_only, one-line errors for bad files
    else:
        state = get_weight(str(weights)).get_state_dict(progress=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("fc.") and not k.startswith("classifier.")]
    if unexpected or [k for k in missing if not k.startswith(("fc.", "classifier."))]:
        raise ValueError(f"backbone weights {weights} do not fit: missing={missing[:5]} unexpected={unexpected[:5]}")


def build_fpn_backbone(
    name: str,
    *,
    levels: str = "p3p7",
    out_channels: int = 256,
    weights: str | Path | None = None,
    trainable_layers: int = 3,
    frozen_bn: bool = True,
) -> BackboneWithFPN:
    """ResNet / MobileNetV3 trunk + FPN.

    levels: ``"p3p7"`` (RetinaNet, FCOS, GFL: C3-C5 + P6/P7 from P5) or ``"p2p6"`` (Faster R-CNN: C2-C5 + max-pool P6).
    The returned module's ``out_channels`` attribute gives the FPN width; its output is an ordered dict of levels,
    finest first.
    """
    if levels not in {"p3p7", "p2p6"}:
        raise ValueError(f"unknown FPN levels {levels!r}; expected 'p3p7' or 'p2p6'")
    extra: ExtraFPNBlock
    if name in RESNETS:
        norm = misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        trunk = RESNETS[name](weights=None, norm_layer=norm)
        load_backbone_weights(trunk, weights)
        _freeze_resnet_layers(trunk, trainable_layers)
        returned = [2, 3, 4] if levels == "p3p7" else [1, 2, 3, 4]
        stage2 = trunk.inplanes // 8
        in_channels = [stage2 * 2 ** (i - 1) for i in returned]
        extra = LastLevelP6P7(out_channels, out_channels) if levels == "p3p7" else LastLevelMaxPool()
        return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned)}
        return BackboneWithFPN(trunk, return_layers, in_channels, out_channels, extra_blocks=extra)
    if name in MOBILENETS:
        norm = misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = MOBILENETS[name](weights=None, norm_layer=norm)
        load_backbone_weights(net, weights)
        features = net.features
        # Freeze all but the last ``trainable_layers`` stages (as torchvision's _mobilenet_extractor does).
        stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
        trainable_from = stages[max(len(stages) - trainable_layers, 0)] if trainable_layers > 0 else len(features)
        for block in list(features)[:trainable_from]:
            block.requires_grad_(False)
        # A strided block starts a new stage, so the block before it ends the previous one (stride 8 ends right
        # before the stride-16 block, and so on); the last block ends the stride-32 stage.
        strided = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
        n_inner = 2 if levels == "p3p7" else 3
        taps = [s - 1 for s in strided[-n_inner:]] + [len(features) - 1]
        return_layers = {str(t): str(i) for i, t in enumerate(taps)}
        in_channels = [features[t].out_channels for t in taps]
        extra = LastLevelP6P7(out_channels, out_channels) if levels == "p3p7" else LastLevelMaxPool()
        return BackboneWithFPN(features, return_layers, in_channels, out_channels, extra_blocks=extra)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _freeze_resnet_layers(trunk: nn.Module, trainable_layers: int) -> None:
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for pname, p in trunk.named_parameters():
        if not any(pname.startswith(layer) for layer in train):
            p.requires_grad_(False)
