"""Training samples resized on the device: the loader hands over uint8 images at their original size and the training
step makes them float and resizes them (``aidkd.data.resize_samples``). One training step gives the losses of the
path that resized on the CPU in the loader (written out here: ``resize_tensor`` on the float image, boxes scaled by
the exact factors and clipped, then the flip)."""
from __future__ import annotations

import warnings

import pytest
import torch

from aidkd.data import (
    KITTI_DEFAULT_IGNORE,
    DetectionDataset,
    collate_fn,
    generate_synth,
    image_to_tensor,
    load_kitti_records,
    read_image,
    resize_tensor,
)
from aidkd.data.transforms import clip_boxes, hflip_boxes, scale_boxes
from aidkd.distill.aid import AIDWeighting
from aidkd.distill.distiller import Distiller
from aidkd.engine.config import config_from_dict
from aidkd.engine.module import DetectionTask
from aidkd.models import build_detector

CLASSES = ["Car", "Pedestrian", "Cyclist"]
MIN_SIZE, MAX_SIZE = 48, 150  # 83x247 images -> 48x143: factors that are not powers of two, sx != sy
KD = {"attention": {"name": "attention", "temperature": 0.1}, "nonlocal": {"name": "nonlocal"}}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_size")
    generate_synth(root, num_images=4, seed=3, width=247, height=83)
    return load_kitti_records(root, "all")


def device_batch(records):
    """Two training samples as the loader gives them: one flipped, one not."""
    def ds(p):
        return DetectionDataset(records, CLASSES, KITTI_DEFAULT_IGNORE, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                train=True, hflip_prob=p, resize=False, uint8=True)
    return collate_fn([ds(1.0)[0], ds(0.0)[3]])


def cpu_resized_sample(ds: DetectionDataset, index: int, flipped: bool):
    """The sample as a loader worker made it by resizing on the CPU."""
    r = ds.records[index]
    image, scale, (sx, sy) = resize_tensor(image_to_tensor(read_image(r.image_path)), MIN_SIZE, MAX_SIZE)
    nh, nw = image.shape[-2:]
    labels = [ds.label_for(o.cls, o.iscrowd) for o in r.objects]
    boxes = torch.tensor([o.box for o, lab in zip(r.objects, labels) if lab > 0]).reshape(-1, 4)
    ignore = torch.tensor([o.box for o, lab in zip(r.objects, labels) if lab == 0]).reshape(-1, 4)
    boxes, ignore = (clip_boxes(scale_boxes(b, sx, sy), nh, nw) for b in (boxes, ignore))
    if flipped:
        image, boxes, ignore = image.flip(-1), hflip_boxes(boxes, nw), hflip_boxes(ignore, nw)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, {"boxes": boxes[keep], "labels": torch.tensor([lab for lab in labels if lab > 0])[keep],
                   "ignore_boxes": ignore[(ignore[:, 2] > ignore[:, 0]) & (ignore[:, 3] > ignore[:, 1])],
                   "image_id": int(r.image_id), "orig_size": (r.height, r.width), "scale": scale, "flipped": flipped,
                   "scale_xy": (sx, sy)}


def cpu_batch(records):
    ds = DetectionDataset(records, CLASSES, KITTI_DEFAULT_IGNORE, min_size=MIN_SIZE, max_size=MAX_SIZE)
    return collate_fn([cpu_resized_sample(ds, 0, True), cpu_resized_sample(ds, 3, False)])


def test_device_resize_makes_the_cpu_resized_sample(records):
    from aidkd.data import resize_samples

    (images, targets), (ref_images, ref_targets) = device_batch(records), cpu_batch(records)
    assert [im.dtype for im in images] == [torch.uint8] * 2
    assert [tuple(im.shape) for im in images] == [(3, 83, 247)] * 2
    assert [t["flipped"] for t in targets] == [True, False]
    assert sum(t["ignore_boxes"].shape[0] for t in targets) > 0  # the ignore regions are exercised
    ready, prepared = resize_samples(images, targets, MIN_SIZE, MAX_SIZE)
    for im, t, ref_im, ref in zip(ready, prepared, ref_images, ref_targets):
        assert im.dtype == torch.float32 and im.shape == ref_im.shape == (3, 48, 143)
        assert torch.allclose(im, ref_im, atol=2e-4)  # the flip before the resize rounds the bilinear weights
        for key in ("boxes", "ignore_boxes"):
            assert t[key].shape == ref[key].shape and torch.allclose(t[key], ref[key], atol=1e-4), key
        assert torch.equal(t["labels"], ref["labels"])
        assert t["scale_xy"] == ref["scale_xy"] and t["scale"] == ref["scale"] and t["scale_xy"][0] != t["scale_xy"][1]
        assert (t["image_id"], t["orig_size"], t["flipped"]) == (ref["image_id"], ref["orig_size"], ref["flipped"])
    assert targets[0]["scale"] == 1.0  # the loader's targets are not changed
    again, _ = resize_samples(ready, prepared, MIN_SIZE, MAX_SIZE)
    assert all(a is b for a, b in zip(again, ready))  # float images are ready as they are


def _task(family: str, distill: bool):
    cfg = config_from_dict({"model": {"arch": family, "backbone": "mobilenet_v3_small", "fpn_channels": 16},
                            "data": {"min_size": MIN_SIZE, "max_size": MAX_SIZE}})
    torch.manual_seed(1)
    student = build_detector(family, "mobilenet_v3_small", len(CLASSES) + 1, min_size=MIN_SIZE, max_size=MAX_SIZE,
                             fpn_channels=16)
    task = DetectionTask(cfg, CLASSES, model=student, with_teacher=False)
    if distill:
        torch.manual_seed(0)
        teacher = build_detector(family, "resnet18", len(CLASSES) + 1, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                 fpn_channels=16).eval()
        task.distiller = Distiller(student, teacher, {k: dict(v) for k, v in KD.items()},
                                   AIDWeighting(granularity="instance", alpha=0.1), sample_shape=(MIN_SIZE, MAX_SIZE),
                                   teacher_loss_cache=True)
    return task.train()


def _step(task, batch):
    torch.manual_seed(0)  # Faster R-CNN samples proposals; the transform draws its size
    losses = task.compute_losses(*batch)
    cache = task.distiller.loss_cache if task.distiller is not None else None
    keys = cache.state_dict()["keys"] if cache is not None else None
    if cache is not None:
        cache.clear()  # the other path computes its own teacher losses
    return losses, keys


@pytest.mark.parametrize("family, distill", [("gfl", False), ("gfl", True), ("retinanet", True), ("fcos", True),
                                             ("fasterrcnn", True)])
def test_a_training_step_on_device_resized_samples_gives_the_cpu_resized_losses(records, family, distill):
    task = _task(family, distill)
    losses, keys = _step(task, device_batch(records))
    ref, ref_keys = _step(task, cpu_batch(records))
    assert set(losses) == set(ref) and (not distill or any(k.startswith("distill/") for k in losses))
    for k, v in ref.items():
        assert torch.allclose(losses[k], v, rtol=1e-5, atol=1e-5), (k, float(losses[k]), float(v))
    assert keys == ref_keys  # AID's teacher-loss cache: the same image, flip and resized size
    if distill:
        assert [k[:2] for k in keys] == [[0, True], [3, False]] and keys[0][2] == [48, 143]


def _synth_cfg(synth_root, **sections):
    return config_from_dict({"data": {"format": "synth", "root": str(synth_root), "min_size": 48, "max_size": 150,
                                      "batch_size": 4, "synth": {"num_images": 20, "seed": 3, "width": 192,
                                                                 "height": 64}}, **sections})


def test_the_training_loader_yields_uint8_images_of_the_original_size(synth_root):
    from aidkd.engine.datamodule import DetectionDataModule

    dm = DetectionDataModule(_synth_cfg(synth_root).data)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    images, targets = [im for b in batches for im in b[0]], [t for b in batches for t in b[1]]
    assert [(im.dtype, tuple(im.shape)) for im in images] == [(torch.uint8, (3, 64, 192))] * len(dm.train_set)
    for t in targets:  # boxes in the original pixels, inside the image
        assert t["scale"] == 1.0 and t["scale_xy"] == (1.0, 1.0) and t["orig_size"] == (64, 192)
        assert bool((t["boxes"][:, 2:] <= torch.tensor([192.0, 64.0])).all())
    assert max(float(t["boxes"][:, 2].max()) for t in targets if t["boxes"].numel()) > 150  # not resized to 150
    images, _ = next(iter(dm.val_dataloader()))  # evaluation: the original float image, resized by the model
    assert {(im.dtype, tuple(im.shape)) for im in images} == {(torch.float32, (3, 64, 192))}


def test_the_training_step_and_callbacks_see_the_batch_the_model_trains_on(synth_root, tmp_path):
    """In the Lightning loop the batch is prepared right after its transfer: the training step and every callback
    (e.g. the AID weight images) see the float, resized images and the boxes in their pixels."""
    import lightning as L

    from aidkd.engine.datamodule import DetectionDataModule

    cfg = _synth_cfg(synth_root, model={"arch": "gfl", "backbone": "mobilenet_v3_small", "fpn_channels": 16},
                     output_dir=str(tmp_path / "run"))
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DetectionTask(cfg, CLASSES), datamodule=DetectionDataModule(cfg.data))
    # one owner for the transfer hooks (the data module): Lightning warns on every run when they are split
    assert not [w for w in caught if "You have overridden" in str(w.message)]
    images, targets = seen[0]
    assert [(im.dtype, tuple(im.shape)) for im in images] == [(torch.float32, (3, 48, 144))] * 4
    assert all(0.0 <= float(im.min()) and float(im.max()) <= 1.0 for im in images)
    assert all(t["scale"] == 0.75 and t["scale_xy"] == (0.75, 0.75) for t in targets)
    boxes = torch.cat([torch.cat([t["boxes"], t["ignore_boxes"]]) for t in targets])
    assert boxes.numel() and bool((boxes[:, 2:] <= torch.tensor([144.0, 48.0])).all())


def test_same_size_images_are_resized_in_one_call_with_each_sample_s_result():
    """A batch's uint8 images of one size go through one interpolation (KITTI's batches: one call, not one per
    image); every sample equals resizing it alone, bit for bit, images of another size and float images too."""
    from aidkd.data import resize_sample, resize_samples
    from tests.conftest import OpCounter

    g = torch.Generator().manual_seed(0)

    def sample(h, w, dtype=torch.uint8):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        boxes = torch.rand(3, 4, generator=g) * torch.tensor([w / 2, h / 2, w / 2, h / 2])
        boxes[:, 2:] += boxes[:, :2] + 1
        return (image if dtype == torch.uint8 else image.float() / 255), {"boxes": boxes, "ignore_boxes": boxes[:1]}

    batch = [sample(83, 247), sample(83, 247), sample(60, 200), sample(83, 247), sample(48, 143, torch.float32)]
    images, targets = [im for im, _ in batch], [t for _, t in batch]
    with OpCounter() as count:
        got_images, got_targets = resize_samples(images, targets, MIN_SIZE, MAX_SIZE)
    assert count.named("upsample_bilinear2d") == 2  # one per size: 83x247 (three images) and 60x200
    for (image, target), got_image, got_target in zip(batch, got_images, got_targets):
        if image.dtype != torch.uint8:
            assert got_image is image and got_target is target  # ready as it is
            continue
        want_image, want_target = resize_sample(image, target, MIN_SIZE, MAX_SIZE)
        assert torch.equal(got_image, want_image)
        assert want_target.keys() == got_target.keys()
        for key in ("boxes", "ignore_boxes"):
            assert torch.equal(got_target[key], want_target[key])
        assert got_target["scale_xy"] == want_target["scale_xy"]


def test_scaling_boxes_by_python_numbers_gives_the_factor_tensor_s_values():
    g = torch.Generator().manual_seed(1)
    boxes = torch.rand(50, 4, generator=g) * 1000
    for sx, sy in ((0.5783132530120482, 0.5789473684210527), (1 / 3, 2.7), (1.0, 1.0)):
        assert torch.equal(scale_boxes(boxes, sx, sy), boxes * torch.tensor([sx, sy, sx, sy]))
