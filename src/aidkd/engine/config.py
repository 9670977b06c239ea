"""Typed run configuration, loaded from YAML (``yaml.safe_load`` rules, plus ``1e-4`` as a float) and validated
strictly.

An unknown key or a value of the wrong type is an error that names the dotted key, e.g.
``config key 'train.lr': expected float, got str 'fast'``. ``--set key=value`` overrides use the same checks.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class SynthConfig:
    num_images: int = 160
    seed: int = 0
    width: int = 320
    height: int = 96
    hard_fraction: float = 0.2
    mislabel_fraction: float = 0.05
    # An easier set (the demo's): only these of Car/Pedestrian/Cyclist/Van/Truck, objects nearer (depth t >= min_t)
    classes: list[str] | None = None
    min_t: float = 0.0
    max_objects: int = 10
    clutter: int = 5


@dataclass
class DataConfig:
    format: Literal["kitti", "coco", "synth", "yolo"] = "synth"
    # KITTI root (training/image_2, training/label_2), YOLO data.yaml (or its folder), or where synth data is written
    root: str | None = None
    train_split: str = "train"  # YOLO: the data.yaml key of each split (train, val or test)
    val_split: str = "val"
    train_split_file: str | None = None
    val_split_file: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    train_ann: str | None = None  # COCO json
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    classes: list[str] | None = None  # default: KITTI's three classes, all COCO categories, or YOLO's names
    # default (KITTI/synth): Van, Truck, Person_sitting, Tram, Misc, DontCare; YOLO: none (boxes of these classes are
    # ignore regions, boxes of unlisted classes background)
    ignore_classes: list[str] | None = None
    min_size: int = 96
    max_size: int = 320
    hflip: float = 0.5
    batch_size: int = 4
    val_batch_size: int | None = None
    # Loader processes per training process; None: min(4, CPU cores per process) on a GPU, 0 on the CPU (where the
    # model needs the cores). Validation loaders use as many, not kept between validations.
    num_workers: int | None = None
    skip_invalid: bool = False
    # Before training, on the first process only: "full" decodes every image, unless the stamp of the run folder or of
    # a run folder beside it (data_check.json: every file's path, size and mtime) shows the data unchanged since a passed check, then
    # "header" reads; "header" reads image headers only; "off" skips the check.
    check: Literal["full", "header", "off"] = "full"
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ModelConfig:
    arch: Literal["retinanet", "fcos", "fasterrcnn", "gfl"] = "retinanet"
    backbone: str = "resnet18"
    fpn_channels: int = 64
    weights: str | None = None  # a local detector checkpoint, or a torchvision weight enum name (needs internet)
    backbone_weights: str | None = None  # a local ImageNet state dict, or e.g. "ResNet50_Weights.IMAGENET1K_V1"
    trainable_backbone_layers: int = 5
    new_classes: bool = False  # `weights` come from another class set: the class-dependent output layers start fresh
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the torchvision detector constructor


@dataclass
class TrainConfig:
    epochs: int = 12
    max_steps: int = -1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    scheduler: Literal["step", "cosine", "none"] = "step"
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # fractions of the total steps
    gamma: float = 0.1
    grad_clip: float | None = 10.0
    precision: str = "auto"  # "auto": bf16-mixed on a GPU that supports it, else 16-mixed; 32 on the CPU
    compile: bool = False  # torch.compile the student's backbone and head(s) (in place: checkpoints are unchanged)
    channels_last: bool = False  # the student's weights (and so its convolutions) in channels-last memory format
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest convolution per input shape (off with deterministic)
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    deterministic: bool = False
    val_every: int = 1  # epochs
    log_every: int = 10  # steps
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    progress_bar: bool = True  # in a terminal; else (or when off) one plain line per epoch: loss, elapsed, ETA


@dataclass
class EvalConfig:
    kitti: bool | None = None  # KITTI AP_R40 (default: on for KITTI/synth data)
    score_thresh: float = 0.05


@dataclass
class TeacherConfig:
    checkpoint: str | None = None  # aidkd model file or Lightning checkpoint of a trained teacher
    arch: str | None = None  # defaults from the checkpoint's metadata
    backbone: str | None = None


@dataclass
class MethodConfig:
    name: str = "attention"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AIDConfig:
    enabled: bool = True
    # instance (the paper) | image | level (the published code) | batch (one weight per batch: AID's weakening of KD
    # without its contrast, a control for ablations); distill/aid.py
    granularity: Literal["instance", "image", "batch", "level"] = "instance"
    alpha: float = 0.1
    # Divide each batch's weights by their mean (not in the paper): only their contrast acts, KD's overall strength
    # stays (distill/aid.py).
    normalize: bool = False
    # Head methods (ld, logit_kd): weight their classification terms by exp(-alpha D^T_cls) and their box terms by
    # exp(-alpha D^T_box), the teacher's loss split in two (distill/head.py); feature methods keep exp(-alpha D^T).
    decoupled: bool = False
    # What the global terms with a per-location residual (spatial attention transfer, non-local, FGD's spatial
    # attention and global terms) take: image_mean (the image's mean instance weight) or pixel (the instance pixel
    # map per location, as the pixel-wise terms); channel terms keep the image mean (distill/aid.py).
    global_terms: Literal["image_mean", "pixel"] = "image_mean"
    # Remember each sample's teacher losses (key: image, flip, resized size) instead of rerunning the teacher's
    # head every step; exact for aidkd's datasets, whose only random augmentation is the flip (teacher_cache.py).
    cache: bool = True
    # Most samples x flips the cache holds (a few floats each); past it the least recently used are dropped (warned).
    cache_max_items: int = 200_000


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    methods: list[MethodConfig] = field(default_factory=list)
    aid: AIDConfig = field(default_factory=AIDConfig)
    # Multiplies every distillation term. docs/method.md's weights were tuned for 256-channel FPNs on full-resolution,
    # ImageNet-initialised models; small from-scratch students need them lower (benchmarks/results/strength_cpu:
    # about 1/1000 with the default loss forms, i.e. 1/100 of the published forms).
    loss_scale: float = 1.0
    image_log_every: int = 200  # steps between instance-weight / attention images in TensorBoard (0: never)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- value ranges

_SEED = (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)")
_POSITIVE = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_ABOVE_ZERO = (lambda v: v > 0, "> 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")

#: The valid range of every numeric config field (``Class.field``: (test, what it says)). Floats must also be
#: finite. A list's test applies to each item; ``None`` (where the type allows it) is always valid.
NUMERIC_RANGES: dict[str, tuple[Any, str]] = {
    "SynthConfig.num_images": _POSITIVE,
    "SynthConfig.seed": _SEED,
    "SynthConfig.width": (lambda v: 16 <= v <= 8192, "in [16, 8192] pixels (the generator's range)"),
    "SynthConfig.height": (lambda v: 16 <= v <= 8192, "in [16, 8192] pixels (the generator's range)"),
    "SynthConfig.hard_fraction": _FRACTION,
    "SynthConfig.mislabel_fraction": _FRACTION,
    "SynthConfig.min_t": _FRACTION,
    "SynthConfig.max_objects": _POSITIVE,
    "SynthConfig.clutter": _NON_NEGATIVE,
    "DataConfig.val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "DataConfig.split_seed": _SEED,
    "DataConfig.min_size": (lambda v: v >= 16, ">= 16"),
    "DataConfig.max_size": (lambda v: v >= 16, ">= 16"),
    "DataConfig.hflip": _FRACTION,
    "DataConfig.batch_size": _POSITIVE,
    "DataConfig.val_batch_size": _POSITIVE,
    "DataConfig.num_workers": _NON_NEGATIVE,
    "ModelConfig.fpn_channels": _POSITIVE,
    "ModelConfig.trainable_backbone_layers": (lambda v: 0 <= v <= 5, "in [0, 5]"),
    "TrainConfig.epochs": _POSITIVE,
    "TrainConfig.max_steps": (lambda v: v == -1 or v >= 1, "-1 (no limit) or >= 1"),
    "TrainConfig.lr": _ABOVE_ZERO,
    "TrainConfig.momentum": _FRACTION,
    "TrainConfig.weight_decay": _NON_NEGATIVE,
    "TrainConfig.warmup_steps": _NON_NEGATIVE,
    "TrainConfig.warmup_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "TrainConfig.milestones": _ABOVE_ZERO,
    "TrainConfig.gamma": _ABOVE_ZERO,
    "TrainConfig.grad_clip": _ABOVE_ZERO,
    "TrainConfig.num_nodes": _POSITIVE,
    "TrainConfig.val_every": _POSITIVE,
    "TrainConfig.log_every": _POSITIVE,
    "TrainConfig.max_bad_steps": _POSITIVE,
    "TrainConfig.limit_train_batches": (lambda v: 0 < v <= 1 if isinstance(v, float) else v >= 1,
                                        "a fraction in (0, 1] or a number of batches >= 1"),
    "TrainConfig.limit_val_batches": (lambda v: 0 <= v <= 1 if isinstance(v, float) else v >= 0,
                                      "a fraction in [0, 1] or a number of batches >= 0"),
    "EvalConfig.score_thresh": _FRACTION,
    "AIDConfig.alpha": _NON_NEGATIVE,
    "AIDConfig.cache_max_items": (lambda v: v >= 1, ">= 1"),
    "DistillConfig.loss_scale": _NON_NEGATIVE,
    "DistillConfig.image_log_every": _NON_NEGATIVE,
    "RunConfig.seed": _SEED,
}


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Refuse a numeric value outside its ``NUMERIC_RANGES`` range (or a non-finite float), naming the dotted key."""
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        rule = NUMERIC_RANGES.get(f"{type(cfg).__name__}.{f.name}")
        if rule is None or value is None:
            continue
        test, text = rule
        for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
            where = key if i is None else f"{key}[{i}]"
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # a type error, reported by _coerce
            if not math.isfinite(v) or not test(v):
                raise ConfigError(f"config key '{where}': must be {'finite and ' if isinstance(v, float) else ''}"
                                  f"{text}, got {v!r}")


# ---------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# A float field also takes a plain fraction of two numbers, e.g. ``1/1000`` (read as a number, nothing evaluated).
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_FRACTION = re.compile(rf"\s*{_NUMBER}\s*/\s*{_NUMBER}\s*")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses; error names ``key``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # an exact type first: `limit_train_batches: 1` is one batch (int), not 100 % (float 1.0)
        for arg in sorted(args, key=lambda a: type(value) is not a):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got "
            f"{type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str) and _FRACTION.fullmatch(value):  # `loss_scale: 1/1000`: a number, not evaluated
            numerator, denominator = (float(v) for v in value.split("/"))
            if denominator != 0:
                return numerator / denominator
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected int, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    _require_format_with_root(data)
    cfg = _build(RunConfig, data)
    check_ranges(cfg)
    _refuse_keys_the_format_ignores(cfg.data)
    return cfg


# data keys that only some formats read: a value other than the default for another format would be ignored
FORMAT_ONLY_KEYS = {"train_split_file": ("kitti", "synth"), "val_split_file": ("kitti", "synth"),
                    "val_fraction": ("kitti", "synth"), "split_seed": ("kitti", "synth"),
                    "train_ann": ("coco",), "train_images": ("coco",), "val_ann": ("coco",), "val_images": ("coco",)}


def _refuse_keys_the_format_ignores(data: DataConfig) -> None:
    defaults = DataConfig()
    for key, formats in FORMAT_ONLY_KEYS.items():
        if data.format not in formats and getattr(data, key) != getattr(defaults, key):
            splits = {"yolo": "data.yaml's keys named by data.train_split / data.val_split",
                      "coco": "data.train_ann / data.val_ann",
                      "kitti": "ImageSets, data.train_split_file / data.val_split_file or data.val_fraction",
                      "synth": "data.val_fraction"}[data.format]
            raise ConfigError(f"config key 'data.{key}' does not apply to {data.format} data (it would be ignored): "
                              f"its splits come from {splits}; remove the key")


def _require_format_with_root(data: dict) -> None:
    """``data.root`` without ``data.format`` is refused: the default (synth) would generate scenes into that folder."""
    section = data.get("data") if isinstance(data, dict) else None
    if not isinstance(section, dict) or section.get("root") in (None, "") or section.get("format") is not None:
        return
    from aidkd.data.layout import detect_layout

    layout = detect_layout(section["root"])
    hint = f" ({section['root']} looks like {layout} data)" if layout in ("kitti", "coco", "yolo") else ""
    raise ConfigError(f"config key 'data.format' is required when data.root is given{hint}: kitti (a KITTI root), "
                      "coco (train_ann/val_ann jsons), yolo (a data.yaml) or synth (aidkd generates scenes into "
                      "data.root)")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a mapping")
    node[parts[-1]] = value


#: the most values a YAML config may expand to, aliases counted as often as they are used: a config has a few
#: hundred; nine nested aliases of ten (a "billion laughs") would build 10^9 objects and exhaust memory
MAX_YAML_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` and ``1e6`` as floats (YAML 1.2; YAML 1.1 wants ``1.0e-4``),
    and refuses a document expanding to more than ``MAX_YAML_VALUES`` values before building any of them."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values ``root`` expands to (an alias's node counts once per use) in time linear in the composed
    graph: each node's size is computed once. A node inside itself (``&a [*a]``) expands without end."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise yaml.YAMLError(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it")
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            open_.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            for child in children:
                total += size(child)
                if total > MAX_YAML_VALUES:
                    raise yaml.YAMLError(f"line {node.start_mark.line + 1}: the document expands to more than "
                                         f"{MAX_YAML_VALUES} values (are aliases '*name' repeating large anchors?)")
            open_.discard(key)
        sizes[key] = total
        return total

    try:
        size(root)
    except RecursionError:
        raise yaml.YAMLError("values nested too deeply") from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` (no python tags, no objects) with YAML 1.2 exponent floats, refusing documents that
    expand past ``MAX_YAML_VALUES`` values (``yaml.YAMLError``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError("values nested too deeply") from None


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: invalid YAML value {raw!r} ({' '.join(str(e).split())})") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
