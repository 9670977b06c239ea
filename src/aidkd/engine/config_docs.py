"""The config key reference (``docs/config.md``), generated from the config dataclasses in ``config.py``.

Types and defaults are read from the dataclasses; the one place that describes each key is ``DESCRIPTIONS`` below.
``tests/test_docs.py`` fails when a dataclass key has no description, a description names no key, or
``docs/config.md`` differs from what this module writes. Regenerate the page with ``make docs``
(``python -m aidkd.engine.config_docs > docs/config.md``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

from aidkd.engine.config import RunConfig

DESCRIPTIONS: dict[str, str] = {
    "name": "run name (shown in logs and reports)",
    "output_dir": "the run folder; a new run refuses a non-empty one unless `--overwrite` (or `--resume` it)",
    "seed": "seed of the model initialisation, batch order and augmentation",

    "data.format": "`kitti`, `coco`, `yolo` or `synth` (scenes generated on first use); required whenever `data.root` is "
                   "given, and a root that looks like another format is an error naming the format to set",
    "data.root": "KITTI root (`training/image_2`, `training/label_2`, optional `ImageSets/{train,val}.txt`), a "
                 "YOLO `data.yaml` (or its folder), or where `synth` scenes are written",
    "data.train_split": "KITTI: the training split's name, read from `ROOT/ImageSets/<name>.txt` (`all`: every "
                        "frame); YOLO: the `data.yaml` key of the split (`train`, `val`, `test`)",
    "data.val_split": "KITTI: the validation split's name, as `data.train_split`; YOLO: its `data.yaml` key",
    "data.train_split_file": "KITTI: a file listing the training frames (one stem per line); overrides `ImageSets`",
    "data.val_split_file": "KITTI: a file listing the validation frames",
    "data.val_fraction": "KITTI / synth without split files: the share of frames (sorted, shuffled with "
                         "`split_seed`) that validates. The split keys of one format are refused for another (they "
                         "would be ignored)",
    "data.split_seed": "KITTI / synth: seed of that shuffle",
    "data.train_ann": "COCO: the training instances json",
    "data.train_images": "COCO: the training image folder",
    "data.val_ann": "COCO: the validation instances json",
    "data.val_images": "COCO: the validation image folder",
    "data.classes": "the positive classes, label i+1 in this order (default: Car, Pedestrian, Cyclist for KITTI / "
                    "synth; every category for COCO; `names` for YOLO)",
    "data.ignore_classes": "classes that become ignore regions, never positive nor negative (default for KITTI / "
                           "synth: Van, Truck, Person_sitting, Tram, Misc, DontCare)",
    "data.min_size": "keep-ratio resize: the short side",
    "data.max_size": "keep-ratio resize: the cap on the long side",
    "data.hflip": "probability of a horizontal flip of a training image",
    "data.batch_size": "training images per device and step",
    "data.val_batch_size": "validation batch size (default: `batch_size`)",
    "data.num_workers": "loader processes per training process; unset: min(4, CPU cores per process) on a GPU, "
                        "0 on the CPU",
    "data.check": "the data check before training: `full` decodes every image (headers only while the "
                  "`data_check.json` of the run folder, or of a run folder beside it, shows the files unchanged), `header` reads headers only, `off` skips it",
    "data.skip_invalid": "drop (and count) invalid images instead of refusing the dataset (`--skip-invalid`)",
    "data.synth.num_images": "generated scenes (train + val)",
    "data.synth.seed": "generator seed (same seed and settings, same scenes)",
    "data.synth.width": "scene width in pixels",
    "data.synth.height": "scene height in pixels",
    "data.synth.hard_fraction": "share of hard instances (low contrast, blur, small, occluded)",
    "data.synth.mislabel_fraction": "share of deliberately mislabelled instances (listed in `synth_meta.json`)",
    "data.synth.classes": "generate only these of Car, Pedestrian, Cyclist, Van, Truck (set `data.classes` to the "
                          "same); default: all",
    "data.synth.min_t": "objects at depth t >= `min_t` only (0 = horizon, 1 = bottom row: larger objects)",
    "data.synth.max_objects": "at most this many objects a scene",
    "data.synth.clutter": "at most this many distractors a scene",

    "model.arch": "detector family: `retinanet`, `fcos`, `fasterrcnn` or `gfl`",
    "model.backbone": "`resnet18/34/50/101`, `mobilenet_v3_large`, `mobilenet_v3_small`",
    "model.fpn_channels": "FPN width",
    "model.weights": "a local detector file, or a torchvision weight enum name (downloads once)",
    "model.backbone_weights": "a local ImageNet state dict, or an enum name such as "
                              "`ResNet50_Weights.IMAGENET1K_V1` (downloads once)",
    "model.trainable_backbone_layers": "backbone stages that train (5: all)",
    "model.new_classes": "`weights` come from another class set: everything loads but the class-dependent output "
                         "layers, which start fresh (named in a warning); any other mismatch stays an error",
    "model.kwargs": "detector constructor options, e.g. `anchor_size: 16` (finest anchor side; torchvision's "
                    "default is 32), `score_thresh`, `bbox_loss`",

    "train.epochs": "training epochs",
    "train.max_steps": "stop after this many optimizer steps (-1: no limit)",
    "train.optimizer": "`sgd` or `adamw`",
    "train.lr": "learning rate",
    "train.momentum": "SGD momentum",
    "train.weight_decay": "weight decay",
    "train.warmup_steps": "steps of linear learning-rate warm-up",
    "train.warmup_factor": "learning-rate factor at the first warm-up step",
    "train.scheduler": "`step` (at `milestones`), `cosine` or `none`",
    "train.milestones": "`step` scheduler: where the rate drops, as fractions of all steps",
    "train.gamma": "`step` scheduler: the factor at each milestone",
    "train.grad_clip": "gradient-norm clipping (null: none)",
    "train.precision": "Lightning precision; `auto`: bf16-mixed on a GPU that supports it, else 16-mixed; 32 on "
                       "the CPU (the teacher's AID losses are always computed in float32)",
    "train.compile": "torch.compile the student's backbone and heads in place (checkpoint keys unchanged)",
    "train.channels_last": "student and teacher weights in channels-last memory format",
    "train.cudnn_benchmark": "cuDNN autotuning per input shape (off with `train.deterministic`)",
    "train.accelerator": "Lightning accelerator (`auto`, `cpu`, `gpu`)",
    "train.devices": "Lightning devices (`auto`, a count, or a list of ids)",
    "train.num_nodes": "machines of a multi-node run",
    "train.strategy": "Lightning strategy; `ddp` for several GPUs or nodes",
    "train.deterministic": "deterministic algorithms (same metrics for the same seed on one machine)",
    "train.val_every": "validate every this many epochs",
    "train.log_every": "log every this many steps",
    "train.max_bad_steps": "consecutive non-finite losses (each step skipped) before the run stops",
    "train.limit_train_batches": "Lightning's: batches per training epoch (int) or a fraction of them (float)",
    "train.limit_val_batches": "Lightning's: batches per validation (int) or a fraction of them (float)",
    "train.progress_bar": "Lightning's progress bar",

    "eval.kitti": "compute KITTI AP_R40 (default: on for KITTI and synth data)",
    "eval.score_thresh": "detections scoring below this are dropped by `eval`, validation, `report` and (the "
                         "default of `--score-thresh`) `predict`",

    "distill.teacher.checkpoint": "the trained teacher (model file or Lightning checkpoint); its classes must match",
    "distill.teacher.arch": "if set, the teacher checkpoint must be of this family",
    "distill.teacher.backbone": "if set, the teacher checkpoint must have this backbone",
    "distill.methods": "the distillation methods, a list of `{name, params}` (below)",
    "distill.methods[].name": "method name (see *Method parameters*)",
    "distill.methods[].params": "the method's parameters (see *Method parameters*)",
    "distill.aid.enabled": "weight the distillation terms by AID",
    "distill.aid.granularity": "`instance` (the paper: each box's weight on its footprint, the image's mean weight "
                               "for global terms), `image`, `level` (the published code: one weight per FPN "
                               "level), or `batch` (the batch's mean instance weight on every term: a control with "
                               "no contrast between instances)",
    "distill.aid.global_terms": "what the global terms with a per-location residual (spatial attention transfer, "
                                "non-local, FGD's spatial and global terms) take: `image_mean` (the image's mean "
                                "instance weight) or `pixel` (each location its instance's weight, as the pixel-wise "
                                "terms); channel terms keep the image mean",
    "distill.aid.alpha": "w = exp(-alpha * D^T), D^T the teacher's loss on the instance",
    "distill.aid.normalize": "divide each batch's weights by their mean (not in the paper): only their contrast "
                             "acts, KD's overall strength stays; the logged `aid/instance_w_*` are then the "
                             "normalised weights",
    "distill.aid.decoupled": "head methods weight their classification terms by exp(-alpha * D^T_cls) and their box "
                             "terms by exp(-alpha * D^T_box) (the AID + LD form); feature methods keep exp(-alpha * "
                             "D^T); `instance` granularity only",
    "distill.aid.cache_max_items": "most samples x flips the teacher-loss cache holds; past it the least recently "
                                   "used entries are dropped (warned once)",
    "distill.aid.cache": "keep each sample's teacher losses (key: image, flip, resized size) so the teacher's head "
                         "runs once per sample, not every step; exact when the flip is the only random "
                         "augmentation; warns when fewer than half the samples hit from the third epoch on; "
                         "`level` never caches",
    "distill.loss_scale": "multiplies every distillation term: about 1/1000 for small from-scratch students with "
                          "the default loss forms, 1 for the paper's configs ([results](results.md))",
    "distill.image_log_every": "steps between instance-weight / attention images in TensorBoard (0: never)",
}

PREAMBLE = """\
# Config reference

<!-- Generated by `python -m aidkd.engine.config_docs` (`make docs`) from the dataclasses in
src/aidkd/engine/config.py and the descriptions in src/aidkd/engine/config_docs.py; edit those, not this page. -->

A run is one YAML file, read with `yaml.safe_load` rules (and `1e-4` as a float) and checked against the dataclasses
in `src/aidkd/engine/config.py`: an unknown key or a wrong type is an error naming the dotted key. `--set KEY=VALUE`
overrides any key on the command line (the value is read as YAML, e.g. `--set train.lr=0.02 data.batch_size=8`).
The `distill` section is only read by `aidkd distill`. The paper's settings are in `configs/kitti_*` and
`configs/coco_traffic_*`; the formulas behind the distillation keys are in [method.md](method.md).
"""

METHODS_INTRO = """\
## Method parameters

Each entry of `distill.methods` is `{name: NAME, params: {...}}`; a parameter left out takes its default below (an
unknown name or parameter is an error listing the accepted ones). Defaults are the AID code's two-stage weights; the
one-stage (GFL) weights are in `configs/*gfl*` and [method.md](method.md) §5. The square-root terms take `reduction`:
`normalized` (default) equals the published loss at the paper's setting (2 images per device, 256 channels,
1333x800) and does not move with batch size, resolution or FPN width; `published` keeps the authors' form exactly.
"""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_dataclass(tp: Any) -> type | None:
    """The dataclass of ``X`` or ``X | None``, else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and _is_dataclass_type(args[0]):
            return args[0]
    return None


def _list_of_dataclass(tp: Any) -> type | None:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if _is_dataclass_type(item):
            return item
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def iter_keys(cls: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every documented key of ``cls`` as (dotted key, annotation, default), in the dataclasses' order.

    A nested dataclass section contributes its own keys, not itself; a list of dataclasses (``distill.methods``)
    contributes itself and its items' keys (``distill.methods[].name``).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _optional_dataclass(tp) is not None:
            yield from iter_keys(_optional_dataclass(tp), f"{key}.")
            continue
        yield key, tp, _default(f)
        item = _list_of_dataclass(tp)
        if item is not None:
            yield from iter_keys(item, f"{key}[].")


def type_text(tp: Any) -> str:
    """A short human name of an annotation: ``int``, ``float | null``, ``retinanet | fcos``, ``list[str]``."""
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(str(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else type_text(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list[{type_text(item)}]" if not _is_dataclass_type(item) else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def value_text(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _section(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def _sections() -> dict[str, list[tuple[str, Any, Any]]]:
    """Keys grouped by section; a section comes before its subsections, sections in the dataclasses' order."""
    keys = list(iter_keys())
    groups: dict[str, list[tuple[str, Any, Any]]] = {}
    for entry in keys:
        groups.setdefault(_section(entry[0]), []).append(entry)

    def position(section: str) -> tuple[int, int]:
        first = min(i for i, (key, _, _) in enumerate(keys)
                    if not section or _section(key) == section or _section(key).startswith((f"{section}.",
                                                                                            f"{section}[]")))
        return first, section.count(".") + section.count("[]")

    return {section: groups[section] for section in sorted(groups, key=position)}


def render_keys() -> list[str]:
    lines: list[str] = []
    for section, entries in _sections().items():
        lines += ["", f"## `{section}`" if section else "## Top level", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default in entries:
            lines.append(f"| `{key}` | {type_text(tp)} | `{_cell(value_text(default))}` | "
                         f"{DESCRIPTIONS.get(key, '')} |")
    return lines


def render_methods() -> list[str]:
    from aidkd.distill.registry import METHODS, method_params

    lines = ["", *METHODS_INTRO.rstrip("\n").split("\n"), "", "| method | what it is | parameters (default) |",
             "|---|---|---|"]
    for name in sorted(METHODS):
        doc = (METHODS[name].__doc__ or "").strip().split("\n")[0].rstrip(".").replace("``", "`")
        hints = _init_hints(METHODS[name])
        params = ", ".join(f"`{p}` {value_text(d)}{_choices(hints.get(p))}" for p, d in method_params(name).items())
        lines.append(f"| `{name}` | {_cell(doc)} | {params} |")
    return lines


def _init_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve at run time: show no choices
        return {}


def _choices(tp: Any) -> str:
    """The choices of a ``Literal`` parameter in brackets, else nothing."""
    return f" ({type_text(tp)})" if typing.get_origin(tp) is Literal else ""


def render() -> str:
    """The whole of ``docs/config.md``."""
    return "\n".join([PREAMBLE.rstrip("\n"), *render_keys(), *render_methods()]) + "\n"


def undocumented_keys() -> list[str]:
    return [key for key, _, _ in iter_keys() if key not in DESCRIPTIONS]


def unknown_descriptions() -> list[str]:
    keys = {key for key, _, _ in iter_keys()}
    return [key for key in DESCRIPTIONS if key not in keys]


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
