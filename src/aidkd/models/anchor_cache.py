"""Anchors built once per input size: they depend only on the padded batch size, the feature sizes and the anchor
settings, never on the images, yet torchvision builds them every forward (~20 aten ops per level and detector, each a
kernel launch on a GPU). A detector keeps the anchors of its last few sizes on its anchor generator."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import nn

CACHE_SIZE = 8  #: input sizes kept per anchor generator (a multi-scale or mixed-aspect run cycles through a few)
_ATTRIBUTE = "_aidkd_anchor_cache"


def cached_anchors(generator: nn.Module, key: Hashable, build: Callable[[], object]):
    """``build()``, or what it returned for the same ``key`` on this ``generator``. Tracing (ONNX export with
    dynamic height and width) always builds: a cached tensor would be frozen into the graph as a constant."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return build()
    cache = generator.__dict__.setdefault(_ATTRIBUTE, OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = build()
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return value
