"""The AID teacher-loss cache: a cached sample's losses equal a recomputed one, and the teacher's head is skipped."""
from __future__ import annotations

import pytest
import torch

from aidkd.distill import distiller as distiller_mod
from aidkd.distill.aid import AIDWeighting
from aidkd.distill.distiller import Distiller
from aidkd.distill.teacher_cache import TeacherLossCache
from aidkd.models import build_detector

H, W = 64, 96
METHODS = {"attention": {"name": "attention"}}


def sample(image_id: int, flipped: bool = False, n_boxes: int = 2, width: int = W):
    g = torch.Generator().manual_seed(image_id * 2 + int(flipped))
    image = torch.rand(3, H, width, generator=g)
    x0 = torch.rand(n_boxes, generator=g) * (width / 2)
    y0 = torch.rand(n_boxes, generator=g) * (H / 2)
    boxes = torch.stack([x0, y0, x0 + 12 + x0 / 2, y0 + 10 + y0 / 2], 1)
    target = {"boxes": boxes, "labels": torch.arange(n_boxes) % 2 + 1, "image_id": image_id, "flipped": flipped}
    return image, target


def make_distiller(arch: str, cache: bool = True, granularity: str = "instance") -> Distiller:
    torch.manual_seed(0)
    kw = {"min_size": H, "max_size": W * 2}
    teacher = build_detector(arch, "resnet18", 3, fpn_channels=16, **kw)
    student = build_detector(arch, "resnet18", 3, fpn_channels=8, **kw)
    return Distiller(student, teacher, dict(METHODS), AIDWeighting(granularity), sample_shape=(H, W),
                     teacher_loss_cache=cache)


def per_instance(d: Distiller, batch) -> list[torch.Tensor]:
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    image_list, targets = distiller_mod.prepare_inputs(d.student, images, targets)
    with torch.no_grad():
        losses, _ = d._teacher_losses(image_list, d.teacher.features(image_list), targets)
    return losses


@pytest.fixture
def head_calls(monkeypatch):
    """How many samples the teacher's loss was computed for."""
    calls = []
    real = distiller_mod.teacher_losses

    def counting(model, images, features, targets, outputs=None):
        calls.append(len(targets))
        return real(model, images, features, targets, outputs)

    monkeypatch.setattr(distiller_mod, "teacher_losses", counting)
    return calls


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl", "fasterrcnn"])
def test_cached_and_partial_batches_equal_the_full_computation(arch, head_calls):
    cached, plain = make_distiller(arch), make_distiller(arch, cache=False)
    assert plain.loss_cache is None
    first = [sample(1), sample(2, n_boxes=3), sample(3, n_boxes=0)]
    for a, b in zip(per_instance(cached, first), per_instance(plain, first)):
        torch.testing.assert_close(a, b)
    # a batch of a seen sample, an unseen one, and a seen image flipped the other way (another key)
    second = [sample(2, n_boxes=3), sample(4), sample(1, flipped=True)]
    head_calls.clear()
    got, want = per_instance(cached, second), per_instance(plain, second)
    assert head_calls == [2, 3]  # the cache ran the head on the two unseen samples only; the plain path on all 3
    assert cached.loss_cache.hits == 1
    for a, b in zip(got, want):
        assert a.shape == b.shape and (b > 0).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    head_calls.clear()
    per_instance(cached, second)
    assert head_calls == []  # everything seen: no teacher head at all


def test_key_does_not_depend_on_the_batch(head_calls):
    """A sample's cached losses are those of the sample alone (padded to its own size): a wider neighbour, which pads
    the batch differently, neither forces a recompute nor changes them (the key held the padded batch shape, so on
    mixed aspect ratios, COCO, hits were rare)."""
    d = make_distiller("retinanet")
    alone = per_instance(d, [sample(1), sample(2)])
    head_calls.clear()
    mixed = per_instance(d, [sample(1), sample(5, width=W + 40)])
    assert head_calls == [1]  # only the unseen wide sample
    torch.testing.assert_close(mixed[0], alone[0])
    # the wide sample's losses were computed on its own padding: the same as in a batch of its own
    fresh = make_distiller("retinanet", cache=False)
    torch.testing.assert_close(mixed[1], per_instance(fresh, [sample(5, width=W + 40)])[0], rtol=1e-4, atol=1e-5)
    # and a narrow sample first seen beside a wide one is computed on its own crop, as if alone
    d2 = make_distiller("retinanet")
    beside_wide = per_instance(d2, [sample(5, width=W + 40), sample(3)])
    torch.testing.assert_close(beside_wide[1], per_instance(fresh, [sample(3)])[0], rtol=1e-4, atol=1e-5)


def test_low_hit_rate_warns_once_but_not_for_the_flips_of_the_second_epoch(caplog):
    d = make_distiller("retinanet")
    per_instance(d, [sample(1), sample(2), sample(7)])
    # the first epoch misses by nature (INFO lines, e.g. the wiring summary, are not warnings)
    assert d.end_epoch(0) == 0.0 and not [r for r in caplog.records if r.levelname == "WARNING"]
    # with hflip 0.5 a sample's second epoch meets its other flip state half the time: ~50 % hits is expected
    # there (the demo's 3-epoch runs warned at 48 %), not a sign of keys that never repeat
    per_instance(d, [sample(1), sample(2, flipped=True), sample(7, flipped=True)])
    with caplog.at_level("WARNING", logger="aidkd.distill"):
        assert d.end_epoch(1) == pytest.approx(1 / 3)
        per_instance(d, [sample(3), sample(4)])  # new keys every epoch (e.g. random crops)
        assert d.end_epoch(2) == 0.0
        per_instance(d, [sample(5), sample(6)])
        d.end_epoch(3)
    warnings = [r for r in caplog.records if "teacher-loss cache" in r.getMessage()]
    assert len(warnings) == 1 and "0% hits in epoch 2" in warnings[0].getMessage()
    assert "distill.aid.cache: false" in warnings[0].getMessage()
    per_instance(d, [sample(5), sample(6)])
    assert d.end_epoch(4) == 1.0


def test_a_resumed_run_does_not_warn_for_its_empty_cache(caplog):
    """A run resumed at epoch 5 starts with an empty cache: its first two epochs miss by nature, like a new run's
    (the kitti101 benchmark's resumed AID runs warned "0% hits in epoch 5" and advised turning the cache off)."""
    d = make_distiller("retinanet")
    with caplog.at_level("WARNING", logger="aidkd.distill"):
        per_instance(d, [sample(1), sample(2)])
        assert d.end_epoch(5) == 0.0
        per_instance(d, [sample(1, flipped=True), sample(2)])
        assert d.end_epoch(6) == pytest.approx(0.5)
    assert not [r for r in caplog.records if "teacher-loss cache" in r.getMessage()]
    with caplog.at_level("WARNING", logger="aidkd.distill"):
        per_instance(d, [sample(3), sample(4)])  # the third epoch this process ran: keys that never repeat warn
        d.end_epoch(7)
    assert [r for r in caplog.records if "0% hits in epoch 7" in r.getMessage()]


def test_level_granularity_and_missing_ids_compute_every_time(head_calls):
    assert make_distiller("retinanet", granularity="level").loss_cache is None
    d = make_distiller("retinanet")
    anonymous = [sample(1), sample(2)]
    for _, t in anonymous:
        del t["image_id"]
    per_instance(d, anonymous)
    per_instance(d, anonymous)
    assert head_calls == [2, 2] and len(d.loss_cache) == 0


def test_forward_uses_the_cache_and_reports_its_hit_rate():
    d = make_distiller("retinanet")
    batch = [sample(1), sample(2)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    first = d(images, targets)
    again = d(images, targets)
    for k in first:
        torch.testing.assert_close(first[k], again[k])
    stats = d.last_stats
    assert stats["teacher_loss_cache_hit_rate"] == pytest.approx(0.5)  # 2 misses, then 2 hits
    assert 0 < stats["instance_w_min"] <= stats["instance_w_max"] <= 1


def test_cache_is_lru_and_checks_the_box_count():
    c = TeacherLossCache(max_items=2)
    keys = [TeacherLossCache.key({"image_id": i, "flipped": False}, (H, W)) for i in range(3)]
    assert TeacherLossCache.key({"image_id": 1}, (H, W)) is None  # no flip flag: never cached
    for k in keys[:2]:
        c.put(k, torch.ones(2))
    assert c.get(keys[0], 2) is not None  # 0 is now the most recent
    c.put(keys[2], torch.ones(1))
    assert len(c) == 2 and c.get(keys[1], 2) is None  # 1 was the least recent: evicted
    assert c.get(keys[0], 3) is None  # another number of boxes under the same key: recompute, never reuse
    assert (c.hits, c.misses) == (1, 2)
    c.clear()
    assert len(c) == 0 and (c.hits, c.misses) == (0, 0)


def test_level_granularity_logs_the_level_weights_it_applies():
    """``level`` applies one weight per FPN level: last_stats reports those, not instance weights,
    which that granularity never applies."""
    d = make_distiller("retinanet", granularity="level")
    batch = [sample(1), sample(2)]
    d([b[0] for b in batch], [b[1] for b in batch])
    stats = d.last_stats
    applied = d.last_inputs.level_weights
    assert stats["level_w_count"] == applied.numel()
    assert stats["level_w_min"] == pytest.approx(float(applied.min()))
    assert stats["level_w_max"] == pytest.approx(float(applied.max()))
    assert "teacher_loss_level_mean" in stats and not any(k.startswith("instance_w") for k in stats)


@pytest.mark.parametrize("granularity", ["instance", "level"])
def test_aid_leaves_the_random_stream_as_kd_does_for_faster_rcnn(granularity):
    """KD + AID and KD runs of one seed are exact pairs only if computing the teacher's losses (Faster R-CNN samples
    proposals at random) consumes no random numbers: the student's own sampling must see the same stream."""
    def step(aid):
        torch.manual_seed(0)
        kw = {"min_size": H, "max_size": W * 2}
        teacher = build_detector("fasterrcnn", "resnet18", 3, fpn_channels=16, **kw)
        student = build_detector("fasterrcnn", "resnet18", 3, fpn_channels=8, **kw)
        d = Distiller(student, teacher, dict(METHODS), aid, sample_shape=(H, W), teacher_loss_cache=False).train()
        batch = [sample(1), sample(2)]
        torch.manual_seed(123)
        out = d([b[0] for b in batch], [b[1] for b in batch])
        return torch.get_rng_state(), float(out["loss_classifier"])

    kd_state, kd_loss = step(None)
    aid_state, aid_loss = step(AIDWeighting(granularity))
    assert torch.equal(kd_state, aid_state) and aid_loss == kd_loss


def test_ranks_share_their_new_entries_and_a_full_cache_says_so_once(caplog):
    """Two processes (simulated all-gather): after an epoch-end exchange each holds the other's entries, so the
    next epoch hits as on one GPU; merged entries are not shared again; a cache past its cap warns once."""
    import logging

    from aidkd.distill.teacher_cache import share_across_ranks

    key = lambda i: TeacherLossCache.key({"image_id": i, "flipped": False}, (H, W))
    ranks = [TeacherLossCache(), TeacherLossCache()]
    for i in range(6):  # a distributed sampler: rank i % 2 sees sample i
        ranks[i % 2].put(key(i), torch.full((2,), float(i)))
    shared = [r.take_new() for r in ranks]
    for me, cache in enumerate(ranks):
        cache.merge(shared[1 - me])
    for cache in ranks:
        assert len(cache) == 6 and all(cache.get(key(i), 2)[0] == i for i in range(6))
        assert cache.take_new() == []  # merged entries are not sent back
    ranks[0].put(key(7), torch.ones(1))
    others = [[(key(8), torch.zeros(3))]]
    assert share_across_ranks(ranks[0], all_gather=lambda mine: [mine, *others]) == 1
    assert ranks[0].get(key(8), 3) is not None and ranks[0].take_new() == []

    small = TeacherLossCache(max_items=2)
    with caplog.at_level(logging.WARNING, logger="aidkd.distill"):
        for i in range(5):
            small.put(key(i), torch.ones(1))
    assert len(small) == 2
    assert sum("cache_max_items=2" in r.getMessage() for r in caplog.records) == 1


def test_a_samples_own_crop_runs_the_teacher_under_the_runs_autocast(monkeypatch):
    """A sample padded to a smaller shape than its batch's runs the teacher's backbone on its crop: under the run's
    autocast (bf16 here), as the batch's features were; the head and loss stay in float32."""
    d = make_distiller("gfl")
    seen = []
    real = d.teacher.features

    def spy(images):
        seen.append((tuple(images.tensors.shape[-2:]), torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu")))
        return real(images)

    monkeypatch.setattr(d.teacher, "features", spy)
    images, targets = zip(sample(1), sample(5, width=W + 40))
    image_list, targets = distiller_mod.prepare_inputs(d.student, list(images), list(targets))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = d.teacher.features(image_list)
        losses, _ = d._teacher_losses(image_list, feats, targets)
    crops = seen[1:]
    assert crops and all(enabled and dtype == torch.bfloat16 for _, enabled, dtype in crops)
    assert all(shape != tuple(image_list.tensors.shape[-2:]) for shape, _, _ in crops)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in losses)
