"""Shared fixtures: a tiny generated driving set and tiny configs, so engine tests run in seconds on a CPU."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aidkd.data import generate_synth

TINY_DATA = {"format": "synth", "min_size": 64, "max_size": 192, "batch_size": 4, "hflip": 0.5,
             "synth": {"num_images": 20, "seed": 3, "width": 192, "height": 64}}
TINY_MODEL = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16}
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("accuracy")``: a script of ``benchmarks/`` as a module (they are not a package), with their
    shared helpers (``_common``) importable."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, num_images=20, seed=3, width=192, height=64)
    (root / ".complete").write_text("ok\n")
    return root


@pytest.fixture
def tiny_cfg(synth_root, tmp_path):
    """A config dict for a run that takes a few seconds: 16 train images, 4 val, RetinaNet-R18 with FPN 16."""

    def make(name="run", **sections):
        cfg = {"name": name, "output_dir": str(tmp_path / name), "seed": 0,
               "data": dict(copy.deepcopy(TINY_DATA), root=str(synth_root)),
               "model": dict(TINY_MODEL),
               "train": {"epochs": 2, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "progress_bar": False}}
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) and key in cfg else value
        return cfg

    return make


QUICK = {"epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1}


@pytest.fixture(scope="module")
def finished_run(synth_root, tmp_path_factory):
    """One quick run (one step, one validation), shared by the run-folder tests that need an existing run."""
    from aidkd.engine.config import config_from_dict
    from aidkd.engine.run import train

    out = tmp_path_factory.mktemp("finished") / "run"
    raw = {"name": "finished", "output_dir": str(out), "data": dict(TINY_DATA, root=str(synth_root)),
           "model": dict(TINY_MODEL), "train": dict(QUICK, progress_bar=False, warmup_steps=1, log_every=1)}
    train(config_from_dict(raw))
    return raw, out


@pytest.fixture(autouse=True)
def _single_thread():
    """Two threads on two shared cores are slower than one for these tiny models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def confident_retinanet_file(path, classes: list[str], height: int, width: int):
    """A RetinaNet model file for ``classes`` that makes a few confident detections on any image (random head weights,
    background logit pushed down): for predict / export tests that need boxes, not accuracy."""
    from aidkd.models import build_detector, model_meta, save_model_file

    torch.manual_seed(0)
    model = build_detector("retinanet", "resnet18", len(classes) + 1, min_size=height, max_size=width, fpn_channels=16)
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            elif "cls_logits" in name:
                p.fill_(-2.0)
                p.view(-1, len(classes) + 1)[:, 0] = -20.0
    return save_model_file(path, model, model_meta(model, classes, height, width, {}))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (``with OpCounter() as c:``): ``ops`` all of them, ``kernels``
    those that are not views, ``named(part)`` those whose name contains ``part``."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def named(self, part: str) -> int:
        return sum(part in n for n in self.names)
