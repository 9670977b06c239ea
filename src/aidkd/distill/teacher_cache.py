"""Per-instance teacher losses remembered across epochs, so AID runs the teacher's head once per sample, not per step.

The teacher is frozen, so its loss on an instance is a function of the input tensor alone. In aidkd's data
pipeline that tensor is fixed by what the dataset reports in each target -- the image (``image_id``), whether it
was flipped (``flipped``: the only random augmentation) and its resized size. The losses of a cached sample are
those of the sample alone, padded to its own size (``Distiller`` computes them so), not to the shape of whatever
batch it came in: the key holds no batch shape, so mixed aspect ratios (COCO) still hit. Without the cache AID costs
the teacher's head forward and per-instance loss every step, most of AID's overhead over plain feature KD
(benchmarks/results/overhead_cpu.md).

Only instance / image / batch granularity can use it: ``level`` needs the batch's per-level loss, which mixes images.
A pipeline with other random augmentations (crops, colour jitter) must turn it off: ``distill.aid.cache: false``
(``Distiller.end_epoch`` warns when the hit rate stays low after the first epoch). Every entry is checked against
the number of boxes of the current target, so a reused key with different labels is recomputed rather than
silently wrong.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from torch import Tensor


class TeacherLossCache:
    """An LRU map ``key -> Tensor[N]`` (the teacher's per-instance losses of one sample).

    max_items bounds memory (an entry is N floats on the teacher's device); 0 or less: unbounded.
    """

    def __init__(self, max_items: int = 200_000):
        self.max_items = int(max_items)
        self._items: OrderedDict[Hashable, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key(target: dict, image_size: Sequence[int]) -> Hashable | None:
        """The cache key of one sample (image, flip, resized size; not the batch's padded shape), or None when the
        target does not say which image and flip it is."""
        if "image_id" not in target or "flipped" not in target:
            return None
        return (target["image_id"], bool(target["flipped"]), tuple(int(x) for x in image_size))

    def get(self, key: Hashable | None, num_boxes: int) -> Tensor | None:
        value = None if key is None else self._items.get(key)
        if value is None or value.shape[0] != num_boxes:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable | None, losses: Tensor) -> None:
        if key is None:
            return
        self._items[key] = losses.detach()
        self._items.move_to_end(key)
        if self.max_items > 0:
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
        self.hits = self.misses = 0
