"""Host overhead of one training step: aten ops and host-device syncs, model vs the rest, batch 2 vs batch 8.

A GPU runs what the host queues; every aten op costs the host a launch (~5-20 us of Python + dispatcher), and every
op that reads a device value on the host (a *sync*) stops the host from queueing until the device has caught up. So
two counts tell, without a GPU, how much of a step would be host-bound:

- **ops**: every aten op of one engine training step (``DetectionTask.training_step`` on a non-logging step,
  backward, gradient clipping at 10, SGD step), counted with a ``TorchDispatchMode``, in four parts:
  ``model`` (the backbones' and heads' forward -- student and teacher -- their backward, the parameters' gradient
  accumulation), ``optimizer`` (clipping + SGD), ``transform`` (torchvision's ``GeneralizedRCNNTransform``: normalise
  and pad, per image by design) and ``rest`` (targets, assignment, losses, AID weights, distillation terms and their
  backward). A backward op counts as ``model`` when its autograd node was created inside a backbone or head
  (tagged through a ``TorchFunctionMode``). ``rest`` is what vectorised code keeps constant in the batch size.
  Views (``select``, ``view``, ...: a new tensor header, no kernel) are counted among the ops and apart.
- **syncs**: ops that read a device value on the host: ``_local_scalar_dense`` (``item``, ``bool``, ``int``,
  ``float``), ``nonzero`` (``torch.where(mask)``), boolean-mask indexing / ``masked_select``, ``bincount``,
  ``unique``, ``repeat_interleave`` without ``output_size``, and ``tolist`` / ``cpu`` / ``numpy`` (counted by
  wrapping those methods: on a CPU they do not reach the dispatcher). Each sync is listed with the aidkd function
  that made it. Reads of host-memory tensors the proxy cannot tell apart (``HOST_ONLY_READS``: torchvision's
  resize factor from the image's shape, ``check_targets`` on host tensors) are counted apart (``host_only_reads``).

Plus the step's time split with torch.profiler: convolutions (forward and backward) vs the other aten ops vs the
rest (Python, dispatcher), for one family at batch 8.

    PYTHONPATH=src .venv/bin/python benchmarks/host_overhead.py                 # all families, batch 2 and 8
    PYTHONPATH=src .venv/bin/python benchmarks/host_overhead.py --families gfl --variants kd_aid_instance
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import aidkd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KITTI_CLASSES, environment, source_commit, synth_batches, write_results

FAMILIES = ("gfl", "retinanet", "fcos", "fasterrcnn")
VARIANTS = ("student", "kd", "kd_aid_instance", "kd_aid_level", "pkd")
# docs/method.md's loss weights (one-stage / two-stage rows), as benchmarks/overhead.py
ONE_STAGE_KD = [{"name": "attention", "temperature": 0.1, "am_weight": 5.6e-4, "at_weight": 2.4e-2},
                {"name": "nonlocal", "nl_weight": 4.9e-4}]
TWO_STAGE_KD = [{"name": "attention", "temperature": 0.5, "am_weight": 4e-5, "at_weight": 8e-3},
                {"name": "nonlocal", "nl_weight": 4e-5}]

# ops that make the host wait for the device (on CUDA), by overload packet name
_ALWAYS_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique", "_unique2",
                "unique_dim", "unique_consecutive", "histc", "equal"}
_MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}
_HOST_READS = ("tolist", "cpu", "numpy")
# Reads of host-memory tensors that the CPU proxy cannot tell from device reads, by (op, aidkd caller): torchvision's
# transform computes each image's resize factor from a CPU tensor of its shape (``torch.tensor(image.shape)``);
# ``check_targets`` reads box values only when they are in host memory. On a GPU neither waits for the device.
HOST_ONLY_READS = {("_local_scalar_dense", "models/targets.py:prepare_inputs"),
                   ("_local_scalar_dense", "models/targets.py:check_targets")}


def is_sync(func, args, kwargs) -> bool:
    """Whether aten op ``func`` reads a device value on the host (or needs one to size its output)."""
    name = func.overloadpacket.__name__
    if name in _ALWAYS_SYNC:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in _MASK_INDEXING and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def is_host_copy(func, args, kwargs) -> bool:
    """A tensor made from host data (``torch.tensor`` / ``as_tensor``: ``lift_fresh``), or a copy from host to
    device memory: on CUDA a blocking one waits for the device's queue (PyTorch syncs the stream after it)."""
    name = func.overloadpacket.__name__
    if name in ("lift_fresh", "lift_fresh_copy"):
        return True
    if name in ("_to_copy", "copy_") and args:
        src = args[1] if name == "copy_" else args[0]
        dst_device = args[0].device if name == "copy_" else kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst_device is not None \
            and torch.device(dst_device).type != "cpu"
    return False


# the package's own files (by its folder: a checkout or virtual environment may itself lie under a folder named aidkd)
PACKAGE_DIR = os.path.dirname(aidkd.__file__) + os.sep


def _caller() -> str:
    """``file:function`` (relative to the package) of the innermost aidkd frame (where an op or sync comes from)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PACKAGE_DIR):
            return f"{path[len(PACKAGE_DIR):]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "torch/lightning"


class StepCounter:
    """Counts aten ops by part and host syncs (with their aidkd caller) while active (``with counter:``).

    ``modules``: (module, part) pairs; ops dispatched inside their forward count in that part (innermost wins), and
    so do the backward ops of autograd nodes created there (``model``). ``counter.part = "optimizer"`` switches the
    part of what follows by hand."""

    def __init__(self, modules: list[tuple[torch.nn.Module, str]], where: bool = True):
        self.ops: Counter[str] = Counter()
        self.views: Counter[str] = Counter()  # of which views (no kernel: a new tensor header on the same memory)
        self.rest_by_caller: Counter[str] = Counter()
        # the rest's ops by pass (forward / backward) and kind (kernel / view): the forward kernels are what the
        # step launches outside the backbones, heads, backward and optimizer
        self.rest_split: Counter[str] = Counter()
        self._in_backward = False
        self.syncs: list[tuple[str, str]] = []
        self.host_copies: list[str] = []
        self.where = where
        self.part = "rest"
        self._stack: list[str] = []
        self._hooks = []
        for module, part in modules:
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, p=part: self._stack.append(p)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o: self._pop()))
        counter = self

        class Functions(TorchFunctionMode):  # tags autograd nodes made inside a model module
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if counter._stack and counter._stack[-1] == "model":
                    for t in (out if isinstance(out, (tuple, list)) else (out,)):
                        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                            t.grad_fn.metadata["aidkd_part"] = "model"
                return out

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                counter._count(func, args, kwargs)
                return func(*args, **kwargs)

        self._modes = [Functions(), Dispatch()]
        self._patched: dict[str, object] = {}

    def _pop(self) -> None:  # a forward hook's return value would replace the module's output
        self._stack.pop()

    def _current_part(self) -> str:
        node = torch._C._current_autograd_node()
        self._in_backward = node is not None
        if node is not None:  # in backward
            if type(node).__name__ == "AccumulateGrad" or node.metadata.get("aidkd_part") == "model":
                return "model"
            return "rest"
        return self._stack[-1] if self._stack else self.part

    def _count(self, func, args, kwargs) -> None:
        part = self._current_part()
        self.ops[part] += 1
        if func.is_view:
            self.views[part] += 1
        if part == "rest":
            self.rest_split[f"{'backward' if self._in_backward else 'forward'}_"
                            f"{'views' if func.is_view else 'kernels'}"] += 1
        if part == "rest" and self.where:
            self.rest_by_caller[_caller()] += 1
        if is_sync(func, args, kwargs):
            self.syncs.append((func.overloadpacket.__name__, _caller()))
        elif is_host_copy(func, args, kwargs):
            self.host_copies.append(_caller())

    def _host_read(self, name: str):
        original = getattr(torch.Tensor, name)

        def wrapped(t, *a, **k):
            self.syncs.append((name, _caller()))
            return original(t, *a, **k)

        return original, wrapped

    def __enter__(self):
        for name in _HOST_READS:
            original, wrapped = self._host_read(name)
            self._patched[name] = original
            setattr(torch.Tensor, name, wrapped)
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return False

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def summary(self) -> dict:
        device = [s for s in self.syncs if s not in HOST_ONLY_READS]
        return {"ops": dict(self.ops), "total_ops": sum(self.ops.values()), "views": dict(self.views),
                "rest_split": dict(self.rest_split), "syncs": len(device),
                "host_only_reads": len(self.syncs) - len(device),
                "sync_sources": dict(Counter(f"{op} @ {where}" for op, where in device).most_common()),
                "host_copies": len(self.host_copies),
                "host_copy_sources": dict(Counter(self.host_copies).most_common()),
                "rest_by_caller": dict(self.rest_by_caller.most_common(15))}


# ------------------------------------------------------------------------------------------------ the step
def model_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """The backbone and head modules of a detector (part ``model``) and its transform (part ``transform``)."""
    if hasattr(model, "rpn"):
        roi = model.roi_heads
        parts = [model.backbone, model.rpn.head, roi.box_roi_pool, roi.box_head, roi.box_predictor]
    else:
        parts = [model.backbone, model.head]
    return [(m, "model") for m in parts] + [(model.transform, "transform")]


class Step:
    """One variant of one family: the engine's ``DetectionTask`` (student alone or distilled) and its optimizer."""

    def __init__(self, family: str, variant: str, student: torch.nn.Module, teacher: torch.nn.Module, args):
        from aidkd.distill.aid import AIDWeighting
        from aidkd.distill.distiller import Distiller
        from aidkd.engine.config import config_from_dict
        from aidkd.engine.module import DetectionTask

        self.student = copy.deepcopy(student).train()
        cfg = config_from_dict({"output_dir": str(Path(args.tmp) / "run"), "model": {"arch": family},
                                "data": {"min_size": args.height, "max_size": args.width}})
        self.task = DetectionTask(cfg, KITTI_CLASSES, model=self.student, with_teacher=False)
        self.task._logging_step = lambda: False  # a step without logging (Lightning logs every train.log_every)
        self.modules = model_modules(self.student)
        if variant != "student":
            aid = (AIDWeighting(granularity=variant.removeprefix("kd_aid_"), alpha=0.1)
                   if variant.startswith("kd_aid_") else None)
            rows = [{"name": "pkd"}] if variant == "pkd" else (TWO_STAGE_KD if family == "fasterrcnn"
                                                                else ONE_STAGE_KD)
            methods = {r["name"]: dict(r) for r in rows}
            self.task.distiller = Distiller(self.student, teacher, methods, aid,
                                            sample_shape=(args.height, args.width), teacher_loss_cache=False)
            self.task.distiller.train()
            self.modules += model_modules(teacher)
        self.params = [p for p in self.task.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def to(self, device: torch.device, autocast: torch.dtype | None = None) -> Step:
        """Run on ``device``, the forward under autocast to ``autocast`` (e.g. bfloat16) when given."""
        self.task.to(device)
        if self.task.distiller is not None:
            self.task.distiller.teacher.to(device)
        self.device, self.autocast = device, autocast
        return self

    def __call__(self, batch, counter: StepCounter | None = None) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        autocast = getattr(self, "autocast", None)
        with torch.autocast(getattr(self, "device", torch.device("cpu")).type, dtype=autocast,
                            enabled=autocast is not None):
            loss = self.task.training_step(batch, 0)
        loss.backward()
        if counter is not None:
            counter.part = "optimizer"
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)  # Lightning's gradient_clip_val (train.grad_clip)
        self.opt.step()
        if counter is not None:
            counter.part = "rest"
        return loss.detach()

    def count(self, batch) -> dict:
        counter = StepCounter(self.modules)
        try:
            with counter:
                self(batch, counter)
        finally:
            counter.close()
        return counter.summary()


CONV = ("conv", "cudnn_convolution", "mkldnn_convolution")


def time_split(step: Step, batch, reps: int) -> dict:
    """Median wall time of a step, and per step the profiler's self time of convolutions and of the other aten ops;
    the remainder is host time outside aten (Python, dispatcher)."""
    from torch.profiler import ProfilerActivity, profile

    step(batch)  # warm-up
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(batch)
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step(batch)
    conv = other = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        if any(c in e.key for c in CONV):
            conv += e.self_cpu_time_total
        else:
            other += e.self_cpu_time_total
    wall_ms = statistics.median(walls) * 1000
    conv_ms, other_ms = conv / 1000 / reps, other / 1000 / reps
    return {"step_ms": wall_ms, "conv_ms": conv_ms, "other_aten_ms": other_ms,
            "outside_aten_ms": max(0.0, wall_ms - conv_ms - other_ms), "conv_share": conv_ms / wall_ms}


def build(family: str, args):
    from aidkd.models import build_detector

    nc = len(KITTI_CLASSES) + 1
    torch.manual_seed(0)
    teacher = build_detector(family, args.teacher, nc, min_size=args.height, max_size=args.width,
                             fpn_channels=args.teacher_fpn).eval()
    torch.manual_seed(1)
    student = build_detector(family, args.student, nc, min_size=args.height, max_size=args.width,
                             fpn_channels=args.student_fpn)
    return teacher, student


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--teacher-fpn", type=int, default=64)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--student-fpn", type=int, default=32)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--time-families", nargs="*", default=["gfl"], help="families whose step time is split (batch: "
                   "the largest of --batches)")
    p.add_argument("--time-reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="/tmp/aidkd_host_overhead")
    p.add_argument("--stem", default="host_overhead_cpu", help="result file name (benchmarks/results/<stem>.json/.md)")
    p.add_argument("--code", default=None, help="what the result names as the measured code (default: this "
                   "checkout's commit), e.g. when PYTHONPATH points at another commit's src/")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*self.log.*")
    warnings.filterwarnings("ignore", ".*self.trainer.*")
    dev = torch.device("cpu")
    n = max(args.batches)
    data = synth_batches(Path(args.tmp) / f"synth_{args.width}x{args.height}_n{n}", 1, n, args.height, args.width)
    images, targets = data[0]
    res = {"command": "PYTHONPATH=src .venv/bin/python benchmarks/host_overhead.py "
                      + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": args.code or source_commit(), "env": environment(dev),
           "settings": {k: getattr(args, k) for k in ("teacher", "teacher_fpn", "student", "student_fpn", "height",
                                                      "width", "batches", "threads")},
           "counts": {}, "times": {}}
    for family in args.families:
        teacher, student = build(family, args)
        for variant in args.variants:
            step = Step(family, variant, student, teacher, args)
            for b in args.batches:
                batch = (images[:b], targets[:b])
                step(batch)  # first step: lazily built state (optimizer buffers) out of the count
                c = step.count(batch)
                res["counts"][f"{family}/{variant}/b{b}"] = c
                print(f"{family:10s} {variant:16s} b{b}: ops {c['total_ops']:6d} (rest {c['ops'].get('rest', 0):5d}, "
                      f"model {c['ops'].get('model', 0):5d}) syncs {c['syncs']:4d} host copies {c['host_copies']:3d}",
                      flush=True)
            if family in args.time_families:
                res["times"][f"{family}/{variant}/b{n}"] = t = time_split(step, (images[:n], targets[:n]),
                                                                          args.time_reps)
                print(f"{family:10s} {variant:16s} b{n}: step {t['step_ms']:.0f} ms, conv {t['conv_ms']:.0f} ms "
                      f"({100 * t['conv_share']:.0f} %)", flush=True)
    md = markdown(res, args)
    print(ratio_table(res, args))
    if not args.no_write:
        jp, mp = write_results(args.stem, res, md)
        print(f"wrote {jp} and {mp}")
    return res


def ratio_table(res: dict, args) -> str:
    lo, hi = min(args.batches), max(args.batches)
    lines = [(f"| family / variant | rest ops b{lo} | rest ops b{hi} | ratio | of which views b{lo} / b{hi} | "
              f"syncs b{lo} | syncs b{hi} | ratio |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for family in args.families:
        for variant in args.variants:
            a, b = res["counts"].get(f"{family}/{variant}/b{lo}"), res["counts"].get(f"{family}/{variant}/b{hi}")
            if a is None or b is None:
                continue
            ra, rb = a["ops"].get("rest", 0), b["ops"].get("rest", 0)
            va, vb = a.get("views", {}).get("rest", "n/a"), b.get("views", {}).get("rest", "n/a")
            lines.append(f"| {family} / {variant} | {ra} | {rb} | {rb / max(ra, 1):.2f} | {va} / {vb} | {a['syncs']} "
                         f"| {b['syncs']} | {b['syncs'] / max(a['syncs'], 1):.2f} |")
    return "\n".join(lines)


def markdown(res: dict, args) -> str:
    s = res["settings"]
    head = (f"Commit: `{res['commit']}`; torch {res['env']['torch']}, {res['env']['cpu_count']} CPU cores, "
            f"{s['threads']} torch thread(s).")
    setup = (f"Teacher {s['teacher']} (FPN {s['teacher_fpn']}) -> student {s['student']} (FPN {s['student_fpn']}), "
             f"{s['height']}x{s['width']} images, batches {s['batches']}; AID's teacher-loss cache off (every step "
             "runs the teacher's losses: a sample's first visit). One engine step on a non-logging step: "
             "`DetectionTask.training_step`, backward, gradient clipping, SGD.")
    legend = ("`model`: backbones' and heads' forward (student and teacher) and backward, gradient accumulation; "
              "`transform`: torchvision's normalise + pad (per image); `optimizer`: clipping + SGD; `rest`: "
              "everything else (targets, assignment, losses, AID weights, distillation terms, their backward); "
              "`of which forward kernels`: the rest's forward ops that launch a kernel (no views, no backward). "
              "A sync is an op that reads a device value on the host (benchmarks/host_overhead.py's docstring). Host "
              "copies: tensors made from host data in the step (`torch.tensor`, `as_tensor`); on CUDA a plain copy "
              "waits for the device's queue, one from pinned memory (`aidkd.models.targets.host_tensor`) does not; "
              "the CPU proxy counts both.")
    lines = ["# Host overhead of one training step (CPU proxy)", "", f"Command: `{res['command']}`  ", head, "",
             setup, "", legend, "", "## Ops and syncs per step", "",
             ("| family / variant / batch | total ops | model | transform | optimizer | rest | of which forward "
              "kernels | syncs | host copies |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, c in res["counts"].items():
        o = c["ops"]
        fwd = c.get("rest_split", {}).get("forward_kernels", "n/a")
        lines.append(f"| {key} | {c['total_ops']} | {o.get('model', 0)} | {o.get('transform', 0)} | "
                     f"{o.get('optimizer', 0)} | {o.get('rest', 0)} | {fwd} | {c['syncs']} | "
                     f"{c.get('host_copies', 'n/a')} |")
    lines += ["", "## Batch growth", "", ratio_table(res, args), ""]
    if res["times"]:
        lines += ["## Step time split (torch.profiler, CPU)", "",
                  ("| family / variant / batch | step ms | convolutions ms | other aten ms | outside aten ms | "
                   "conv share |"), "|---|---:|---:|---:|---:|---:|"]
        for key, t in res["times"].items():
            lines.append(f"| {key} | {t['step_ms']:.0f} | {t['conv_ms']:.0f} | {t['other_aten_ms']:.0f} | "
                         f"{t['outside_aten_ms']:.0f} | {100 * t['conv_share']:.0f} % |")
        lines.append("")
    lines += ["## Where the syncs come from (largest batch)", ""]
    hi = max(args.batches)
    for key, c in res["counts"].items():
        if key.endswith(f"/b{hi}") and c["sync_sources"]:
            top = "; ".join(f"{k} x{v}" for k, v in list(c["sync_sources"].items())[:8])
            lines.append(f"- {key}: {top}")
    lines += ["", "## Largest sources of `rest` ops (largest batch, aidkd function)", ""]
    for key, c in res["counts"].items():
        if key.endswith(f"/b{hi}"):
            top = "; ".join(f"{k} {v}" for k, v in list(c["rest_by_caller"].items())[:6])
            lines.append(f"- {key}: {top}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
