"""Per-instance teacher losses remembered across epochs, so AID runs the teacher's head once per sample, not per step.

The teacher is frozen, so its loss on an instance is a function of the input tensor alone. In aidkd's data
pipeline that tensor is fixed by what the dataset reports in each target -- the image (``image_id``), whether it
was flipped (``flipped``: the only random augmentation) and its resized size. The losses of a cached sample are
those of the sample alone, padded to its own size (``Distiller`` computes them so), not to the shape of whatever
batch it came in: the key holds no batch shape, so mixed aspect ratios (COCO) still hit. Without the cache AID costs
the teacher's head forward and per-instance loss every step, most of AID's overhead over plain feature KD
(benchmarks/results/overhead_cpu.md).

With several processes (DDP) each sees a shard of the samples per epoch; :func:`share_across_ranks` (called at
every epoch end) gives every process the entries the others computed, so the hit rate does not depend on the
number of GPUs (an all-gather of the epoch's new entries, a few floats per sample, once an epoch: no cost per step).

Only instance / image / batch granularity can use it: ``level`` needs the batch's per-level loss, which mixes images.
A pipeline with other random augmentations (crops, colour jitter) must turn it off: ``distill.aid.cache: false``
(``Distiller.end_epoch`` warns when the hit rate stays low after the first epoch). Every entry is checked against
the number of boxes of the current target, so a reused key with different labels is recomputed rather than
silently wrong.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

log = logging.getLogger("aidkd.distill")


class TeacherLossCache:
    """An LRU map ``key -> Tensor[N]`` (the teacher's per-instance losses of one sample).

    max_items bounds memory (an entry is N floats on the teacher's device); 0 or less: unbounded.
    """

    def __init__(self, max_items: int = 200_000):
        self.max_items = int(max_items)
        self._items: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._new: list[Hashable] = []  # keys put since the last ``take_new``
        self._warned_full = False
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

    def put(self, key: Hashable | None, losses: Tensor, new: bool = True) -> None:
        if key is None:
            return
        self._items[key] = losses.detach()
        self._items.move_to_end(key)
        if new:
            self._new.append(key)
        if self.max_items > 0 and len(self._items) > self.max_items:
            if not self._warned_full:
                self._warned_full = True
                log.warning("AID teacher-loss cache: more samples x flips than distill.aid.cache_max_items=%d; the "
                            "least recently used are dropped and computed again when they come back (raise the "
                            "cap to keep them; an entry is a few floats)", self.max_items)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def state_dict(self) -> dict:
        """The entries (oldest first) and counters as plain types and two CPU tensors (``weights_only``-loadable,
        compact for hundreds of thousands of entries): a resumed run continues with the cache it stopped with."""
        values = list(self._items.values())
        return {"keys": [[k[0], k[1], list(k[2])] for k in self._items],
                "lengths": torch.tensor([len(v) for v in values], dtype=torch.int64),
                "values": torch.cat([v.detach().float().cpu() for v in values]) if values else torch.zeros(0),
                "hits": self.hits, "misses": self.misses}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.clear()
        parts = torch.split(state["values"].to(device), state["lengths"].tolist())
        for (image_id, flipped, size), v in zip(state["keys"], parts):
            self._items[(image_id, bool(flipped), tuple(int(x) for x in size))] = v
        self.hits, self.misses = int(state["hits"]), int(state["misses"])

    def take_new(self) -> list[tuple[Hashable, Tensor]]:
        """The entries put since the last call (still cached), on the CPU, to share with other processes."""
        keys, self._new = self._new, []
        return [(k, self._items[k].cpu()) for k in dict.fromkeys(keys) if k in self._items]

    def merge(self, entries: Sequence[tuple[Hashable, Tensor]], device=None) -> int:
        """Add entries computed elsewhere (another process); returns how many were new here."""
        added = 0
        for key, losses in entries:
            if key not in self._items:
                self.put(key, losses.to(device) if device is not None else losses, new=False)
                added += 1
        return added

    def clear(self) -> None:
        self._items.clear()
        self._new.clear()
        self.hits = self.misses = 0


def share_across_ranks(cache: TeacherLossCache, all_gather: Callable[[object], list] | None = None,
                       device=None) -> int:
    """Give every process the entries the others computed since the last call (``all_gather(obj)`` returns every
    rank's ``obj``; default: ``torch.distributed.all_gather_object`` when a process group is initialised, else
    nothing to share). Every process must call it at the same point. Returns the entries added here."""
    if all_gather is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            cache.take_new()
            return 0

        def all_gather(obj):
            out = [None] * dist.get_world_size()
            dist.all_gather_object(out, obj)
            return out

    mine = cache.take_new()
    return sum(cache.merge(entries, device) for entries in all_gather(mine) if entries is not mine)
