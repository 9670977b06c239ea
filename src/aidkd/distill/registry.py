"""Name -> distillation method module, and ``build_method`` that builds one from plain keyword parameters."""
from __future__ import annotations

import inspect
from typing import Any

from .attention import AttentionDistill
from .base import DistillMethod
from .fgd import FGDDistill
from .fitnet import FitNetDistill
from .head import CrossHeadKD, LocalizationDistill, LogitKD
from .nonlocal_kd import NonLocalDistill
from .pkd import PKDDistill

METHODS: dict[str, type[DistillMethod]] = {
    "attention": AttentionDistill,
    "nonlocal": NonLocalDistill,
    "fitnet": FitNetDistill,
    "fgd": FGDDistill,
    "pkd": PKDDistill,
}
"""The feature methods (FPN features in, ``DistillInputs`` without ``head``)."""

HEAD_METHODS: dict[str, type[DistillMethod]] = {
    "logit_kd": LogitKD,
    "ld": LocalizationDistill,
    "cross_head": CrossHeadKD,
}
"""The head methods (``aidkd.distill.head``: they read ``DistillInputs.head``); ``distill.methods`` may mix both."""

_POSITIONAL = ("self", "student_channels", "teacher_channels", "num_levels")


def method_params(name: str) -> dict[str, Any]:
    """The keyword parameters of method ``name`` with their defaults (what a config may set)."""
    cls = _lookup(name)
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in _POSITIONAL and p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_method(name: str, student_channels: int, teacher_channels: int, num_levels: int,
                 **params: Any) -> DistillMethod:
    """Build method ``name`` (a key of ``METHODS``); unknown names or parameters raise ``ValueError`` listing the
    accepted ones."""
    cls = _lookup(name)
    accepted = method_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for distillation method {name!r}; accepted: "
                         f"{sorted(accepted)}")
    return cls(student_channels, teacher_channels, num_levels, **params)


def register_method(name: str, cls: type[DistillMethod]) -> None:
    """Add a method (a ``DistillMethod`` subclass taking ``(student_channels, teacher_channels, num_levels, *,
    **params)``) under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
        raise TypeError(f"register_method: {cls!r} is not a DistillMethod subclass")
    known = {**METHODS, **HEAD_METHODS}
    if name in known and known[name] is not cls:
        raise ValueError(f"distillation method {name!r} is already registered as {known[name].__name__}")
    (HEAD_METHODS if cls.uses_head else METHODS)[name] = cls


def _lookup(name: str) -> type[DistillMethod]:
    known = {**METHODS, **HEAD_METHODS}
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown distillation method {name!r}; available: {sorted(known)}") from None
