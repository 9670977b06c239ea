"""GPU-facing training defaults: precision, loader workers and pinned memory, cuDNN autotuning, compile and
channels-last of the student."""
from __future__ import annotations

import os

import pytest
import torch

from aidkd.engine import datamodule, run
from aidkd.engine.config import config_from_dict
from aidkd.engine.module import DetectionTask, compile_detector


def _cfg(**train):
    return config_from_dict({"model": {"arch": "gfl", "backbone": "mobilenet_v3_small", "fpn_channels": 16},
                             "data": {"min_size": 64, "max_size": 128}, "train": train})


@pytest.mark.parametrize("gpu, bf16, expected", [(False, False, "32-true"), (True, True, "bf16-mixed"),
                                                 (True, False, "16-mixed")])
def test_auto_precision_is_bf16_where_the_gpu_has_it(monkeypatch, gpu, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert run._precision(_cfg()) == expected
    assert run._precision(_cfg(precision="32-true")) == "32-true"
    assert run._precision(_cfg(accelerator="cpu")) == "32-true"


def test_loaders_pin_memory_and_default_their_workers_on_a_gpu(monkeypatch, synth_root):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert datamodule.default_num_workers(on_gpu=True) == 3  # min(4, 6 cores / 2 processes)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert datamodule.default_num_workers(on_gpu=True) == 4
    assert datamodule.default_num_workers(on_gpu=False) == 0
    cfg = config_from_dict({"data": {"format": "synth", "root": str(synth_root), "min_size": 64, "max_size": 192,
                                     "synth": {"num_images": 20, "seed": 3, "width": 192, "height": 64}}})
    dm = datamodule.DetectionDataModule(cfg.data, on_gpu=True)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.pin_memory and val.pin_memory and train.num_workers == 4 == val.num_workers
    assert train.persistent_workers and not val.persistent_workers
    cpu = datamodule.DetectionDataModule(cfg.data, on_gpu=False)
    cpu.setup("fit")
    assert not cpu.train_dataloader().pin_memory and cpu.num_workers == 0


def test_cudnn_benchmark_follows_the_config_but_never_with_deterministic(tmp_path):
    assert run.build_trainer(_cfg(progress_bar=False), tmp_path).strategy is not None  # builds
    assert torch.backends.cudnn.benchmark is True
    run.build_trainer(_cfg(progress_bar=False, deterministic=True), tmp_path / "d")
    assert torch.backends.cudnn.benchmark is False
    run.build_trainer(_cfg(progress_bar=False, cudnn_benchmark=False), tmp_path / "o")
    assert torch.backends.cudnn.benchmark is False


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 128, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[60.0, 5.0, 120.0, 40.0]]), "labels": torch.tensor([2])}]
    return images, targets


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("AIDKD_COMPILE_TESTS"), reason="inductor compiles for minutes on a CPU; "
    "AIDKD_COMPILE_TESTS=1 runs it"))])
def test_a_compiled_step_gives_the_eager_loss(backend):
    torch.manual_seed(0)
    task = DetectionTask(_cfg(compile=True, channels_last=True), ["Car", "Pedestrian"])
    task.model.train()
    names = set(task.state_dict())
    eager = task.compute_losses(*_batch())
    assert compile_detector(task.model, backend=backend) == ["backbone", "head"]
    compiled = task.compute_losses(*_batch())
    sum(compiled.values()).backward()
    assert set(task.state_dict()) == names  # in place: checkpoints keep their keys
    for k, v in eager.items():
        assert torch.allclose(compiled[k], v, rtol=1e-4, atol=1e-6), (k, float(v), float(compiled[k]))
    assert all(p.grad is not None for p in task.model.head.parameters() if p.requires_grad)


def test_channels_last_and_compile_are_applied_once_at_fit_setup(monkeypatch):
    calls = []
    monkeypatch.setattr("aidkd.engine.module.compile_detector", lambda model: calls.append(model))
    task = DetectionTask(_cfg(compile=True, channels_last=True), ["Car", "Pedestrian"])
    task.setup("fit")
    task.setup("fit")
    conv = next(m for m in task.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert calls == [task.model]


def test_training_targets_are_checked_on_the_host_before_they_move():
    """The device step reads no box values (``check_targets`` checks only host tensors); the data module checks
    every training batch before its transfer, naming the target and box."""
    from types import SimpleNamespace

    dm = datamodule.DetectionDataModule(_cfg().data)
    good = ([torch.zeros(3, 8, 8)], [{"boxes": torch.tensor([[1.0, 1.0, 4.0, 4.0]]), "labels": torch.tensor([1])}])
    bad = ([torch.zeros(3, 8, 8)] * 2, [good[1][0], {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]),
                                                     "labels": torch.tensor([1])}])
    dm.trainer = SimpleNamespace(training=True)
    assert dm.on_before_batch_transfer(good, 0) is good
    with pytest.raises(ValueError, match=r"target 1: box 0 .* no positive width and height"):
        dm.on_before_batch_transfer(bad, 0)
    dm.trainer = SimpleNamespace(training=False)  # validation batches are not training targets
    assert dm.on_before_batch_transfer(bad, 0) is bad
