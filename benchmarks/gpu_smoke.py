"""GPU smoke benchmark: GFL R101 -> R50 at 1333x800 in bf16, images per second of student alone, KD and KD + AID,
with the GPU's busy share and the host's share of each step from torch.profiler, and peak memory.

Each variant is the engine's training step (``DetectionTask.training_step`` on a non-logging step, backward,
gradient clipping, SGD; benchmarks/host_overhead.py's ``Step``) on random-initialised models and a fixed batch of
random images with random boxes (weights do not change the speed; nothing is downloaded), cuDNN autotuning on (the
padded shape is fixed). A variant warms up (the first steps tune cuDNN and grow the allocator), then runs for
``--budget`` seconds; three more steps run under torch.profiler: ``gpu_busy`` = the summed time of the GPU's kernels
/ the steps' wall time, ``host_share`` = 1 - gpu_busy (the share of a step the GPU waits for the host). AID runs with
its teacher-loss cache off (every step computes the teacher's losses: a sample's first visit, the most it costs).

    benchmarks/gpu_smoke.sh                    # on a GPU machine: install, then this (under 8 minutes)
    benchmarks/gpu_smoke.sh --cpu --tiny       # the same code path on a CPU in seconds (tests/test_gpu_smoke.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KITTI_CLASSES, environment, source_commit, write_results
from host_overhead import Step

VARIANTS = ("student", "kd", "kd_aid_instance")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (float32)")
    p.add_argument("--tiny", action="store_true", help="R18 -> MobileNetV3-small (FPN 16) at 64x128, batch 2, 2 "
                   "measured steps")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of measured steps per variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=None, help="folder for the result files (default: benchmarks/results)")
    args = p.parse_args(argv)
    args.family = "gfl"
    if args.tiny:
        args.teacher, args.student, args.teacher_fpn, args.student_fpn = "resnet18", "mobilenet_v3_small", 16, 16
        args.height, args.width, args.batch, args.budget = 64, 128, 2, 0.0
    else:
        args.teacher, args.student, args.teacher_fpn, args.student_fpn = "resnet101", "resnet50", 256, 256
        args.height, args.width = 800, 1333
    args.tmp = "/tmp/aidkd_gpu_smoke"
    return args


def random_batch(args, device: torch.device):
    """``--batch`` random images with 3-12 random boxes each (labels of the three KITTI classes), on ``device``."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(args.batch):
        n = int(torch.randint(3, 13, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([args.width * 0.8, args.height * 0.8])
        wh = (torch.rand(n, 2, generator=g) * 0.3 + 0.05) * torch.tensor([args.width, args.height])
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([args.width, args.height]).float())], dim=1)
        images.append(torch.rand(3, args.height, args.width, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 4, (n,), generator=g).to(device)})
    return images, targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Step, batch, args, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    warmup = 1 if args.tiny else 3
    for _ in range(warmup):
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, t0 = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - t0 < args.budget:
        step(batch)
        steps += 1
        if device.type == "cuda" and steps % 5 == 0:
            sync(device)
    sync(device)
    wall = time.perf_counter() - t0
    out = {"steps": steps, "seconds": wall, "images_per_s": steps * len(batch[0]) / wall,
           "step_ms": 1000 * wall / steps}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    reps = 1 if args.tiny else 3
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(reps):
            step(batch)
        sync(device)
    profiled = (time.perf_counter() - t0) * 1e6  # us
    if device.type == "cuda":
        kernels = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        out["gpu_busy"] = min(1.0, kernels / profiled)
        out["host_share"] = 1.0 - out["gpu_busy"]
    else:  # on a CPU: the convolutions' share of the step, and the rest
        conv = sum(e.self_cpu_time_total for e in prof.key_averages()
                   if e.key.startswith("aten::") and "conv" in e.key)
        out["conv_share"] = min(1.0, conv / profiled)
        out["host_share"] = 1.0 - out["conv_share"]
    return out


def main(argv=None) -> dict:
    from aidkd.models import build_detector

    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*self.log.*")
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)  # two threads on a shared machine wait for each other at every parallel region
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu")
    torch.backends.cudnn.benchmark = True
    autocast = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    nc = len(KITTI_CLASSES) + 1
    torch.manual_seed(0)
    teacher = build_detector("gfl", args.teacher, nc, min_size=args.height, max_size=args.width,
                             fpn_channels=args.teacher_fpn).eval()
    torch.manual_seed(1)
    student = build_detector("gfl", args.student, nc, min_size=args.height, max_size=args.width,
                             fpn_channels=args.student_fpn)
    batch = random_batch(args, device)
    res = {"command": "benchmarks/gpu_smoke.sh " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": source_commit(), "env": environment(device),
           "settings": {k: getattr(args, k) for k in ("teacher", "student", "teacher_fpn", "student_fpn", "height",
                                                      "width", "batch", "budget")},
           "precision": str(autocast or torch.float32).replace("torch.", ""), "variants": {}}
    for variant in args.variants:
        step = Step("gfl", variant, student, teacher, args).to(device, autocast)
        res["variants"][variant] = r = measure(step, batch, args, device)
        print(f"{variant:16s} {r['images_per_s']:7.2f} images/s  step {r['step_ms']:7.1f} ms  host share "
              f"{100 * r['host_share']:5.1f} %" + (f"  peak {r['peak_memory_gib']:.1f} GiB"
                                                    if "peak_memory_gib" in r else ""), flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stem = f"gpu_smoke_{'cpu' if device.type == 'cpu' else 'gpu'}{'_tiny' if args.tiny else ''}"
    md = markdown(res)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
        (out / f"{stem}.md").write_text(md + "\n")
    else:
        write_results(stem, res, md)
    return res


def markdown(res: dict) -> str:
    s, env = res["settings"], res["env"]
    head = (f"Commit: `{res['commit']}`; device {env.get('gpu', env['device'])}; torch {env['torch']}; "
            f"precision {res['precision']}.")
    setup = (f"GFL {s['teacher']} (FPN {s['teacher_fpn']}) -> {s['student']} (FPN {s['student_fpn']}), "
             f"{s['width']}x{s['height']}, batch {s['batch']}, {s['budget']:g} s of measured steps per variant "
             "(benchmarks/gpu_smoke.py's docstring).")
    lines = ["# GPU smoke benchmark", "", f"Command: `{res['command']}`  ", head, "", setup, "",
             "| variant | images/s | step ms | GPU busy | host share | peak memory GiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in res["variants"].items():
        busy = f"{100 * r['gpu_busy']:.0f} %" if "gpu_busy" in r else "n/a"
        peak = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "n/a"
        lines.append(f"| {name} | {r['images_per_s']:.2f} | {r['step_ms']:.0f} | {busy} | "
                     f"{100 * r['host_share']:.0f} % | {peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
