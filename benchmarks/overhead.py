"""Training-step cost of distillation: student alone vs KD vs KD+AID, side by side in one process.

Every variant trains its own copy of the same initial student on the *same* fixed batches; the variants run
interleaved (round r runs every variant once on batch r, in an order rotated by r), after warm-up rounds, and the
median of the measured step times is reported. A step is what the engine does per batch: forward (student losses
+ teacher features [+ teacher per-instance losses for AID] + distillation terms), backward, gradient clipping at
10, SGD step (and, on the GPU, fp16 autocast + GradScaler like Lightning's ``16-mixed``).

Variants: ``student`` (detection losses only), ``kd`` (attention + non-local, Zhang & Ma), ``kd_aid_instance`` and
``kd_aid_level`` (the same KD with AID weights; AID runs the teacher's head and its per-instance loss assignment every
step: the cost of a sample's first visit) and ``kd_aid_instance_cached`` (``distill.aid.cache``, the engine's
default: a sample's teacher losses are kept, so once the warm-up rounds -- at least ``--batches`` of them -- have
seen every batch, no step runs the teacher's head). A real run misses the cache at most twice per image (two flip
states), so its average is between the two; the table estimates it for a 12-epoch schedule.

Threads: the CPU profile runs torch with one intra-op thread (``--threads``). On a machine shared with other
processes, two OpenMP threads on two cores wait at every parallel region for a descheduled partner; we measured
the same teacher forward at 220 ms with 1 thread and 2.9-4.4 s with 2 threads under a load average of ~4.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over each measured step minus the memory allocated just
before it (the step's transient: activations, gradients, temporaries), in the shared process. On the CPU, the
allocator is not visible to ``tracemalloc`` (torch tensors bypass Python's allocator), so each variant runs again
in a fresh subprocess and we report the growth of the resident set: peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` after setup; ``ru_maxrss`` when that is not allowed) minus the RSS after setup, over
warm-up + a few steps. That includes the optimizer state and gradients created by the first step.

    .venv/bin/python benchmarks/overhead.py                  # CPU profile (R50 -> R18, 96x320, batch 4)
    .venv/bin/python benchmarks/overhead.py --profile gpu    # R101 -> R18 and R50, 384x1248, batch 8, CUDA
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    KITTI_CLASSES,
    device_tag,
    environment,
    fmt,
    pick_device,
    summarize,
    sync,
    synth_batches,
    to_device,
    write_results,
)

PROFILES = {
    "cpu": {"arch": "retinanet", "teacher": "resnet50", "teacher_fpn": 64, "students": ["resnet18"],
            "student_fpn": 32, "height": 96, "width": 320, "batch": 4, "steps": 20, "warmup": 4, "batches": 4,
            "device": "cpu", "threads": 1, "amp": False, "mem_steps": 3},
    "gpu": {"arch": "retinanet", "teacher": "resnet101", "teacher_fpn": 256, "students": ["resnet18", "resnet50"],
            "student_fpn": 256, "height": 384, "width": 1248, "batch": 8, "steps": 50, "warmup": 10, "batches": 4,
            "device": "cuda", "threads": None, "amp": True, "mem_steps": 3},
}
VARIANTS = ("student", "kd", "kd_aid_instance", "kd_aid_level", "kd_aid_instance_cached")
CACHE_EPOCHS = 12  # the paper's KITTI schedule, for the expected AID cost of a whole run with the teacher-loss cache
TARGET = 1.03  # KD+AID step time over KD's


def verdict(ratio: float) -> str:
    return "meets" if ratio <= TARGET else "MISSES"

# method.md loss-weight table: one-stage (GFL/RetinaNet) AID row, two-stage AID row
ONE_STAGE_KD = [{"name": "attention", "temperature": 0.1, "am_weight": 5.6e-4, "at_weight": 2.4e-2},
                {"name": "nonlocal", "nl_weight": 4.9e-4}]
TWO_STAGE_KD = [{"name": "attention", "temperature": 0.5, "am_weight": 4e-5, "at_weight": 8e-3},
                {"name": "nonlocal", "nl_weight": 4e-5}]


def kd_methods(arch: str) -> dict[str, dict]:
    rows = TWO_STAGE_KD if arch == "fasterrcnn" else ONE_STAGE_KD
    return {r["name"]: dict(r) for r in rows}


# ------------------------------------------------------------------------------------------------ building
class Runner:
    """One variant: its own student copy (+ distiller), optimizer and step function."""

    def __init__(self, name: str, student_backbone: str, student: torch.nn.Module, teacher: torch.nn.Module,
                 args, dev: torch.device):
        from aidkd.distill.aid import AIDWeighting
        from aidkd.distill.distiller import Distiller

        self.name, self.student_backbone, self.dev, self.amp = name, student_backbone, dev, args.amp
        self.student = copy.deepcopy(student).to(dev).train()
        if name == "student":
            self.module = self.student
            self.distiller = None
        else:
            aid = None
            if name.startswith("kd_aid_"):
                aid = AIDWeighting(granularity=name.removeprefix("kd_aid_").removesuffix("_cached"), alpha=0.1)
            self.distiller = Distiller(self.student, teacher, kd_methods(args.arch), aid,
                                       sample_shape=(args.height, args.width),
                                       teacher_loss_cache=name.endswith("_cached")).to(dev)
            self.distiller.teacher.to(dev)
            self.distiller.train()
            self.module = self.distiller
        # the distiller does not own the student: its parameters come from the student itself
        extra = list(self.distiller.parameters()) if self.distiller is not None else []
        self.params = [p for p in [*self.student.parameters(), *extra] if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and dev.type == "cuda")

    @property
    def key(self) -> str:
        return f"{self.student_backbone}/{self.name}"

    def losses(self, images, targets) -> dict:
        from aidkd.models.ops import detection_losses, extract_features, prepare_inputs

        if self.distiller is not None:
            return self.distiller(images, targets)
        image_list, targets = prepare_inputs(self.student, images, targets)
        return detection_losses(self.student, image_list, extract_features(self.student, image_list), targets)

    def step(self, images, targets) -> float:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.amp and self.dev.type == "cuda"):
            losses = self.losses(images, targets)
        total = sum(losses.values())
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(total.detach())

    def trainable_mib(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.params) / 2**20


def build_models(args, dev: torch.device):
    from aidkd.models import build_detector

    nc = len(KITTI_CLASSES) + 1
    torch.manual_seed(args.seed)
    if args.teacher_checkpoint:
        from aidkd.models import load_detector

        teacher, _ = load_detector(args.teacher_checkpoint, classes=KITTI_CLASSES)
    else:
        teacher = build_detector(args.arch, args.teacher, nc, min_size=args.height, max_size=args.width,
                                 fpn_channels=args.teacher_fpn)
    teacher.to(dev).eval()
    students = {}
    for bb in args.students:
        torch.manual_seed(args.seed + 1)
        students[bb] = build_detector(args.arch, bb, nc, min_size=args.height, max_size=args.width,
                                      fpn_channels=args.student_fpn)
    return teacher, students


def get_batches(args, dev):
    cache = Path(args.data_cache or tempfile.gettempdir()) / (
        f"aidkd_bench_synth_{args.width}x{args.height}_n{args.batches * args.batch}")
    return [to_device(b, dev) for b in synth_batches(cache, args.batches, args.batch, args.height, args.width)]


# ------------------------------------------------------------------------------------------------ AID breakdown
@torch.no_grad()
def aid_breakdown(runner: Runner, batches, reps: int, dev: torch.device) -> dict:
    """Median time of each piece AID adds to a KD step, timed on its own (no grad, like in the distiller):
    the teacher's head + per-instance loss assignment (``teacher_losses``), the weight maps (``AIDWeighting.make``)
    and the logging statistics (``AIDWeighting.stats``). For scale, also the teacher's backbone + FPN forward."""
    from aidkd.models.ops import prepare_inputs, teacher_losses

    d = runner.distiller
    amp = runner.amp and dev.type == "cuda"
    parts: dict[str, list[float]] = {"teacher_features": [], "teacher_losses": [], "aid_make": [], "aid_stats": []}

    def timed(key, fn, *a):
        sync(dev)
        t0 = time.perf_counter()
        out = fn(*a)
        sync(dev)
        parts[key].append(time.perf_counter() - t0)
        return out

    for i in range(reps):
        images, targets = batches[i % len(batches)]
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            image_list, tg = prepare_inputs(d.student, images, targets)
            t_feats = timed("teacher_features", d.teacher.features, image_list)
            tl = timed("teacher_losses", teacher_losses, d.teacher.model, image_list, t_feats, tg)
            shapes = [tuple(list(t_feats.values())[j].shape[-2:]) for j in d.levels.teacher_idx]
            per_level = tl.per_level[d.levels.teacher_idx] if tl.per_level is not None else None
            boxes = [t["boxes"] for t in tg]
            timed("aid_make", d.aid.make, tl.per_instance, per_level, boxes, shapes, d.levels.strides, len(images))
            timed("aid_stats", d.aid.stats, tl.per_instance)
    return {k: summarize(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------ FLOPs
def step_gflops(runner: Runner, batch) -> dict:
    """FLOPs of one full training step (forward + backward; FlopCounterMode counts both), in GFLOPs, with the
    teacher-side parts split out: what the teacher's forward and AID's teacher losses cost inside it."""
    from torch.utils.flop_counter import FlopCounterMode

    from aidkd.models.ops import prepare_inputs, teacher_losses

    images, targets = batch
    with FlopCounterMode(display=False) as fc:
        runner.step(images, targets)
    out = {"step": fc.get_total_flops() / 1e9}
    d = runner.distiller
    if d is not None:
        with torch.no_grad():
            image_list, tg = prepare_inputs(d.student, images, targets)
            with FlopCounterMode(display=False) as fc:
                t_feats = d.teacher.features(image_list)
            out["teacher_features"] = fc.get_total_flops() / 1e9
            with FlopCounterMode(display=False) as fc:
                teacher_losses(d.teacher.model, image_list, t_feats, tg)
            out["teacher_losses"] = fc.get_total_flops() / 1e9
    return out


def flops_section(runners: list[Runner], batches) -> dict:
    flops = {r.key: step_gflops(r, batches[0]) for r in runners}
    ratios = {}
    for bb in {r.student_backbone for r in runners}:
        f = {v: flops[f"{bb}/{v}"]["step"] for v in VARIANTS}
        ratios[bb] = {"kd/student": f["kd"] / f["student"], "kd_aid_instance/kd": f["kd_aid_instance"] / f["kd"],
                      "kd_aid_level/kd": f["kd_aid_level"] / f["kd"],
                      "kd_aid_instance_cached/kd": f["kd_aid_instance_cached"] / f["kd"],
                      "teacher_losses/kd_step": flops[f"{bb}/kd_aid_instance"]["teacher_losses"] / f["kd"]}
    return {"gflops_per_step": flops, "ratios": ratios}


def flops_markdown(res: dict) -> str:
    s, env = res["settings"], res["env"]
    fl = res["flops"]
    lines = [f"# Training-step FLOPs of KD and AID ({res['profile']} profile models)", "",
             (f"{s['arch']}: teacher {s['teacher']} (FPN {s['teacher_fpn']}) -> students {', '.join(s['students'])} "
              f"(FPN {s['student_fpn']}); images {s['height']}x{s['width']}, batch {s['batch']}. GFLOPs of one "
              "training step (forward + backward) counted with torch.utils.flop_counter.FlopCounterMode (conv / "
              f"matmul, 2 per MAC) on {env['device']}; device-independent, so this predicts the compute ratios of "
              "the profile where it was not timed."), "",
             ("| student | variant | GFLOPs / step | teacher backbone+FPN GFLOPs | AID teacher head + losses GFLOPs |"),
             "|---|---|---|---|---|"]
    for key, f in fl["gflops_per_step"].items():
        bb, v = key.split("/")
        lines.append(f"| {bb} | {v} | {f['step']:.1f} | {f.get('teacher_features', float('nan')):.1f} | "
                     f"{f.get('teacher_losses', float('nan')):.1f} |")
    lines += [""]
    for bb, r in fl["ratios"].items():
        lines.append(f"- {bb}: " + "; ".join(f"{k} {v:.3f}" for k, v in r.items()))
    lines += ["", "Command: `.venv/bin/python benchmarks/overhead.py " + " ".join(res.get("argv", [])) + "`"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ memory (CPU)
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def mem_probe(args) -> dict:
    """Child process: build one variant, reset the peak RSS, run a few steps, report the RSS growth."""
    dev = pick_device(args.device)
    teacher, students = build_models(args, dev)
    batches = get_batches(args, dev)
    bb, name = args.mem_probe.split("/")
    runner = Runner(name, bb, students[bb], teacher, args, dev)
    del students
    base = _status_kib("VmRSS")
    method = "VmHWM after clear_refs"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        method = "ru_maxrss (peak not reset after setup)"
    for i in range(args.mem_steps):
        images, targets = batches[i % len(batches)]
        runner.step(images, targets)
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.mem_probe, "rss_after_setup_MiB": base / 1024, "peak_rss_MiB": peak / 1024,
            "step_growth_MiB": (peak - base) / 1024, "method": method, "steps": args.mem_steps}


def cpu_memory(args, keys: list[str]) -> dict[str, dict]:
    out = {}
    for key in keys:
        cmd = [sys.executable, __file__, "--_mem-probe", key, *args.passthrough]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMPROBE ")]
        if res.returncode != 0 or not lines:
            print(f"memory probe for {key} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            out[key] = {"error": res.stderr[-500:]}
            continue
        out[key] = json.loads(lines[-1][len("MEMPROBE "):])
        print(f"  memory {key}: +{out[key]['step_growth_MiB']:.0f} MiB over setup RSS")
    return out


# ------------------------------------------------------------------------------------------------ main
def measure(args) -> dict:
    dev = pick_device(args.device)
    env = environment(dev)
    print(f"device {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    teacher, students = build_models(args, dev)
    batches = get_batches(args, dev)
    runners = [Runner(v, bb, students[bb], teacher, args, dev) for bb in args.students for v in VARIANTS]
    if args.flops_only:
        return {"profile": args.profile, "env": env, "flops_only": True,
                "settings": {k: getattr(args, k) for k in ("arch", "teacher", "teacher_fpn", "students",
                                                           "student_fpn", "height", "width", "batch")},
                "flops": flops_section(runners, batches)}
    times: dict[str, list[float]] = {r.key: [] for r in runners}
    gpu_mem: dict[str, float] = {r.key: 0.0 for r in runners}
    rounds = args.warmup + args.steps
    t_start = time.time()
    for rnd in range(rounds):
        images, targets = batches[rnd % len(batches)]
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
        for r in order:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
            sync(dev)
            t0 = time.perf_counter()
            r.step(images, targets)
            sync(dev)
            dt = time.perf_counter() - t0
            if rnd >= args.warmup:
                times[r.key].append(dt)
                if dev.type == "cuda":
                    gpu_mem[r.key] = max(gpu_mem[r.key], (torch.cuda.max_memory_allocated(dev) - before) / 2**20)
        if rnd == args.warmup - 1:
            print(f"warm-up done ({args.warmup} rounds, {time.time() - t_start:.0f} s)")
        elif rnd >= args.warmup and (rnd - args.warmup + 1) % 5 == 0:
            med = {k: summarize(v)["median_ms"] for k, v in times.items()}
            print(f"round {rnd - args.warmup + 1}/{args.steps}: " + ", ".join(f"{k} {m:.0f} ms" for k, m in med.items()))
    stats = {k: summarize(v) for k, v in times.items()}
    flops = flops_section(runners, batches) if args.flops else None
    breakdown = {}
    if args.breakdown:
        print("AID component breakdown ...")
        for r in runners:
            if r.distiller is not None and r.distiller.aid is not None and r.distiller.loss_cache is None:
                breakdown[r.key] = aid_breakdown(r, batches, args.steps, dev)
    result = {"profile": args.profile, "env": env,
              "settings": {k: getattr(args, k) for k in ("arch", "teacher", "teacher_fpn", "students", "student_fpn",
                                                         "height", "width", "batch", "steps", "warmup", "batches",
                                                         "amp", "lr", "seed", "teacher_checkpoint")},
              "kd_methods": kd_methods(args.arch), "steps": stats, "trainable_MiB":
              {r.key: r.trainable_mib() for r in runners}, "ratios": {}, "memory": {}, "aid_breakdown": breakdown,
              "flops": flops}
    pairs = (("kd", "student"), ("kd_aid_instance", "kd"), ("kd_aid_level", "kd"), ("kd_aid_instance", "student"),
             ("kd_aid_instance_cached", "kd"))
    for bb in args.students:
        med = {v: stats[f"{bb}/{v}"]["median_ms"] for v in VARIANTS}
        result["ratios"][bb] = {f"{a}/{b}": med[a] / med[b] for a, b in pairs}
        # paired: the ratio within each round (the two steps ran back to back on the same batch), then the median;
        # robust to load drift from other processes on a shared machine
        result.setdefault("paired_ratios", {})[bb] = {
            f"{a}/{b}": statistics.median(x / y for x, y in zip(times[f"{bb}/{a}"], times[f"{bb}/{b}"]))
            for a, b in pairs}
    if dev.type == "cuda":
        result["memory"] = {"method": "torch.cuda.max_memory_allocated during a step minus memory_allocated "
                                      "before it (max over measured steps), MiB", "per_variant_MiB": gpu_mem}
    elif not args.no_memory:
        print("memory: one fresh subprocess per variant")
        probes = cpu_memory(args, list(times))
        method = next((p.get("method") for p in probes.values() if "method" in p), "n/a")
        result["memory"] = {"method": f"peak RSS growth over the RSS after setup, fresh process per variant, "
                                      f"{args.mem_steps} steps ({method}), MiB",
                            "per_variant_MiB": {k: p.get("step_growth_MiB") for k, p in probes.items()},
                            "probes": probes}
    result["seconds"] = time.time() - t_start
    return result


def markdown(res: dict) -> str:
    s = res["settings"]
    env = res["env"]
    hw = env.get("gpu") or f"{env['cpu_count']} CPU cores"
    lines = [f"# Training-step overhead of KD and AID ({res['profile']} profile, {env['device']})", "",
             (f"{s['arch']}: teacher {s['teacher']} (FPN {s['teacher_fpn']}) -> students {', '.join(s['students'])} "
             f"(FPN {s['student_fpn']}); images {s['height']}x{s['width']}, batch {s['batch']}; "
             f"{s['warmup']} warm-up + {s['steps']} measured interleaved rounds on the same {s['batches']} batches; "
             f"amp={s['amp']}. torch {env['torch']}, {hw}, "
             f"{env['torch_threads']} threads; load average at start {env.get('loadavg_at_start', 'n/a')}."), "",
             ("| student | variant | median step ms | p25-p75 ms | vs student | vs KD | step memory MiB | "
              "trainable MiB |"), "|---|---|---|---|---|---|---|---|"]
    mem = res.get("memory", {}).get("per_variant_MiB", {})
    for bb in s["students"]:
        base = res["steps"][f"{bb}/student"]["median_ms"]
        kd = res["steps"][f"{bb}/kd"]["median_ms"]
        for v in VARIANTS:
            k = f"{bb}/{v}"
            st = res["steps"][k]
            lines.append(f"| {bb} | {v} | {st['median_ms']:.1f} | {st['p25_ms']:.1f}-{st['p75_ms']:.1f} | "
                         f"{st['median_ms'] / base:.3f} | {st['median_ms'] / kd:.3f} | {fmt(mem.get(k), 0)} | "
                         f"{res['trainable_MiB'][k]:.1f} |")
    lines += ["", f"Ratios of median step times (target: KD+AID / KD <= {TARGET}):", ""]
    for bb, r in res["ratios"].items():
        p = res["paired_ratios"][bb]
        run = p["kd_aid_instance_cached/kd"] + (p["kd_aid_instance/kd"] - p["kd_aid_instance_cached/kd"]) * min(
            1.0, 2 / CACHE_EPOCHS)
        lines.append(f"- {bb}: KD/student {r['kd/student']:.3f} (paired {p['kd/student']:.3f}); "
                     f"KD+AID(instance)/KD {r['kd_aid_instance/kd']:.3f} (paired {p['kd_aid_instance/kd']:.3f}, "
                     f"{verdict(p['kd_aid_instance/kd'])} the {TARGET} target) without the cache, "
                     f"{r['kd_aid_instance_cached/kd']:.3f} (paired {p['kd_aid_instance_cached/kd']:.3f}, "
                     f"{verdict(p['kd_aid_instance_cached/kd'])} it) with every sample cached, about {run:.3f} "
                     f"({verdict(run)} it) averaged over a {CACHE_EPOCHS}-epoch run that misses twice per image; "
                     f"KD+AID(level)/KD {r['kd_aid_level/kd']:.3f} (paired {p['kd_aid_level/kd']:.3f}; level AID "
                     f"cannot cache); KD+AID(instance)/student {r['kd_aid_instance/student']:.3f} "
                     f"(paired {p['kd_aid_instance/student']:.3f})")
    lines += ["", ("Ratios are of median step times; 'paired' is the median over rounds of the ratio of the two "
                   "variants' steps in the same round (same batch, back to back), which is less sensitive to load "
                   "from other processes.")]
    if res.get("aid_breakdown"):
        lines += ["", ("What AID adds to a KD step, each piece timed on its own (median ms over the same batches, "
                  "no grad); the fraction is of the KD step's median:"), "",
                  ("| variant | teacher backbone+FPN (already in KD) | teacher head + per-instance losses | "
                  "AID weight maps | AID stats (logging) | AID total | AID total / KD step |"),
                  "|---|---|---|---|---|---|---|"]
        for key, b in res["aid_breakdown"].items():
            kd = res["steps"][key.split("/")[0] + "/kd"]["median_ms"]
            added = sum(b[p]["median_ms"] for p in ("teacher_losses", "aid_make", "aid_stats"))
            lines.append(f"| {key} | {b['teacher_features']['median_ms']:.1f} | {b['teacher_losses']['median_ms']:.1f} "
                         f"| {b['aid_make']['median_ms']:.1f} | {b['aid_stats']['median_ms']:.1f} | {added:.1f} | "
                         f"{added / kd:.3f} |")
    if res.get("flops"):
        lines += ["", "Compute per training step (GFLOPs, forward + backward, FlopCounterMode):", ""]
        for bb, r in res["flops"]["ratios"].items():
            f = {k.split("/")[1]: v["step"] for k, v in res["flops"]["gflops_per_step"].items() if k.startswith(bb)}
            lines.append(f"- {bb}: " + ", ".join(f"{v} {g:.1f}" for v, g in f.items()) + "; "
                         + "; ".join(f"{k} {v:.3f}" for k, v in r.items()))
    if res.get("memory"):
        lines += ["", f"Memory: {res['memory']['method']}."]
    lines += ["", "Command: `.venv/bin/python benchmarks/overhead.py " + " ".join(res.get("argv", [])) + "`"]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--device", help="cpu | cuda | auto (default: the profile's)")
    ap.add_argument("--arch", choices=["retinanet", "fcos", "gfl", "fasterrcnn"])
    ap.add_argument("--teacher", help="teacher backbone")
    ap.add_argument("--teacher-fpn", type=int)
    ap.add_argument("--teacher-checkpoint", help="a trained teacher (aidkd model file); default: random init")
    ap.add_argument("--students", nargs="+", help="student backbones")
    ap.add_argument("--student-fpn", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, help="measured rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--batches", type=int, help="distinct fixed batches cycled through")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="fp16 autocast (CUDA)")
    ap.add_argument("--mem-steps", type=int)
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    ap.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting FLOPs per step")
    ap.add_argument("--flops-only", action="store_true",
                    help="only count FLOPs per step (e.g. the gpu profile's models on the CPU); no timing")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip timing AID's pieces on their own")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--data-cache", help="where the generated batches are cached (default: the temp dir)")
    ap.add_argument("--out-stem", help="results file stem (default overhead_<device>)")
    ap.add_argument("--_mem-probe", dest="mem_probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_mem-probe" in argv:
        i = argv.index("--_mem-probe")
        argv = argv[:i] + argv[i + 2:]
    args.argv = argv
    args.passthrough = argv
    for k, v in PROFILES[args.profile].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_probe:
        print("MEMPROBE " + json.dumps(mem_probe(args)))
        return 0
    res = measure(args)
    res["argv"] = args.argv
    dev = pick_device(args.device)
    if args.flops_only:
        stem = args.out_stem or f"overhead_flops_{args.profile}"
        md = flops_markdown(res)
    else:
        stem = args.out_stem or f"overhead_{device_tag(dev)}"
        md = markdown(res)
    jp, mp = write_results(stem, res, md)
    print(md)
    print(f"\nwrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
