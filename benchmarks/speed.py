"""Teacher vs student inference cost: latency, throughput, parameters, GFLOPs; ONNX Runtime for the student.

Per detector family (``--archs``) the teacher and each student are built with random weights (speed does not
depend on training) and timed end to end in eval mode under ``torch.inference_mode()`` -- ``model(list_of_images)``,
i.e. normalisation, the (identity) resize, backbone + FPN + head and post-processing (decoding, NMS):

* latency: one image (batch 1), median over ``--runs`` calls; teacher and student calls are interleaved;
* throughput: a batch of ``--batch`` images, images per second from the median batch time;
* parameters and GFLOPs of one image (``torch.utils.flop_counter.FlopCounterMode``: matmul/conv FLOPs, 2 per MAC;
  element-wise ops and NMS are not counted);
* ONNX Runtime (CPU execution provider) for each student: exported with ``aidkd.export.export_onnx`` (which also
  checks parity against PyTorch), or -- if that module is missing -- with ``torch.onnx.export`` directly; ``n/a`` when
  the export fails. The ONNX graph takes one image, so its "throughput" is ``--batch`` sequential calls.

The CPU profile uses one torch thread (and one ONNX Runtime intra-op thread), see ``overhead.py`` for why.

    .venv/bin/python benchmarks/speed.py                  # CPU profile
    .venv/bin/python benchmarks/speed.py --profile gpu    # CUDA, 384x1248, R101 -> R18 / R50, fp16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KITTI_CLASSES, device_tag, environment, pick_device, summarize, sync, write_results

PROFILES = {
    "cpu": {"archs": ["retinanet", "fasterrcnn"], "teacher": "resnet50", "teacher_fpn": 64, "students": ["resnet18"],
            "student_fpn": 32, "height": 96, "width": 320, "batch": 8, "runs": 20, "warmup": 3, "device": "cpu",
            "threads": 1, "amp": False, "onnx": True},
    "gpu": {"archs": ["gfl", "fasterrcnn"], "teacher": "resnet101", "teacher_fpn": 256,
            "students": ["resnet18", "resnet50"], "student_fpn": 256, "height": 384, "width": 1248, "batch": 8,
            "runs": 50, "warmup": 10, "device": "cuda", "threads": None, "amp": True, "onnx": False},
}


def scene_images(n: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """Generated driving scenes (CHW float in [0, 1]) at the model's working size."""
    from aidkd.data.synth import render_scene

    out = []
    for i in range(n):
        img, _, _ = render_scene(seed + i, width=width, height=height)
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0))
    return out


def count_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model([image])
    return fc.get_total_flops() / 1e9


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_interleaved(fns: dict[str, callable], runs: int, warmup: int, dev: torch.device) -> dict[str, list[float]]:
    """Call every fn once per round (order rotated per round); warm-up rounds are not recorded."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            sync(dev)
            t0 = time.perf_counter()
            fns[n]()
            sync(dev)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------------ ONNX
def onnx_student(model: torch.nn.Module, meta: dict, example: torch.Tensor, workdir: Path) -> dict:
    """Export the student; returns {'path', 'how', 'parity', 'error'}."""
    onnx_path = workdir / f"{meta['arch']}_{meta['backbone']}.onnx"
    try:
        from aidkd.export import ParityError, export_onnx
        from aidkd.models import save_model_file
    except ImportError as e:  # the export module is not there yet: export directly
        return _onnx_direct(model, onnx_path, example, f"aidkd.export not importable ({e})")
    ckpt = workdir / f"{meta['arch']}_{meta['backbone']}.pt"
    save_model_file(ckpt, model, meta)
    try:
        report = export_onnx(ckpt, onnx_path, num_samples=2, latency_runs=1)
        return {"path": str(onnx_path), "how": "aidkd.export.export_onnx", "parity": "OK",
                "report": report}
    except ParityError as e:
        failed = onnx_path.with_name(onnx_path.name + ".failed")
        return {"path": str(failed) if failed.exists() else None, "how": "aidkd.export.export_onnx",
                "parity": "FAILED", "report": str(e)[:2000]}
    except Exception as e:  # noqa: BLE001
        return {"path": None, "how": "aidkd.export.export_onnx", "error": f"{type(e).__name__}: {e}"[:2000]}


def _onnx_direct(model, onnx_path: Path, example: torch.Tensor, why: str) -> dict:
    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m([x[0]])[0]
            return o["boxes"], o["scores"], o["labels"]

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Wrap(model.eval()), (example[None],), str(onnx_path), dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["boxes", "scores", "labels"],
                              dynamic_axes={"images": {2: "height", 3: "width"}})
        return {"path": str(onnx_path), "how": f"torch.onnx.export (dynamo=False); {why}", "parity": "not checked"}
    except Exception as e:  # noqa: BLE001
        return {"path": None, "how": f"torch.onnx.export; {why}", "error": f"{type(e).__name__}: {e}"[:2000]}


def time_onnx(path: str, images: list[torch.Tensor], runs: int, warmup: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    one = {"images": images[0][None].numpy()}
    feeds = [{"images": im[None].numpy()} for im in images]
    t = time_interleaved({"b1": lambda: sess.run(None, one),
                          "bN": lambda: [sess.run(None, f) for f in feeds]}, runs, warmup, torch.device("cpu"))
    b1, bn = summarize(t["b1"]), summarize(t["bN"])
    return {"latency": b1, "batch": bn, "images_per_s": len(images) / (bn["median_ms"] / 1000.0),
            "threads": opts.intra_op_num_threads}


# ------------------------------------------------------------------------------------------------ main
def bench_arch(arch: str, args, dev: torch.device, images: list[torch.Tensor], workdir: Path) -> dict:
    from aidkd.models import build_detector, model_meta

    nc = len(KITTI_CLASSES) + 1
    models = {}
    specs = {"teacher": (args.teacher, args.teacher_fpn), **{f"student_{bb}": (bb, args.student_fpn)
                                                             for bb in args.students}}
    for name, (bb, fpn) in specs.items():
        torch.manual_seed(0)
        models[name] = build_detector(arch, bb, nc, min_size=args.height, max_size=args.width,
                                      fpn_channels=fpn).eval()
    out: dict = {"models": {}}
    for name, m in models.items():
        out["models"][name] = {"backbone": specs[name][0], "fpn_channels": specs[name][1], "params": n_params(m),
                               "gflops": count_gflops(m, images[0])}
    for m in models.values():
        m.to(dev)
    dimages = [im.to(dev) for im in images]
    amp = args.amp and dev.type == "cuda"

    def call(m, ims):
        def f():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                m(ims)
        return f

    print(f"[{arch}] timing batch 1 ...")
    lat = time_interleaved({n: call(m, dimages[:1]) for n, m in models.items()}, args.runs, args.warmup, dev)
    print(f"[{arch}] timing batch {args.batch} ...")
    thr = time_interleaved({n: call(m, dimages) for n, m in models.items()}, max(5, args.runs // 2),
                           max(1, args.warmup // 2), dev)
    for n in models:
        o = out["models"][n]
        o["latency"] = summarize(lat[n])
        o["batch"] = summarize(thr[n])
        o["images_per_s"] = len(images) / (o["batch"]["median_ms"] / 1000.0)
    t = out["models"]["teacher"]
    out["ratios"] = {}
    for bb in args.students:
        s = out["models"][f"student_{bb}"]
        out["ratios"][bb] = {"params student/teacher": s["params"] / t["params"],
                             "gflops student/teacher": s["gflops"] / t["gflops"],
                             "latency student/teacher": s["latency"]["median_ms"] / t["latency"]["median_ms"],
                             "throughput student/teacher": s["images_per_s"] / t["images_per_s"]}
    if args.onnx:
        for bb in args.students:
            name = f"student_{bb}"
            m = models[name].cpu().float()
            meta = model_meta(m, KITTI_CLASSES, args.height, args.width, {})
            print(f"[{arch}] ONNX export of {name} ...")
            info = onnx_student(m, meta, images[0], workdir)
            if info.get("path"):
                try:
                    info.update(time_onnx(info["path"], images, args.runs, args.warmup))
                    pt = out["models"][name]["latency"]["median_ms"] if dev.type == "cpu" else None
                    if pt:
                        info["latency onnx/pytorch"] = info["latency"]["median_ms"] / pt
                except Exception as e:  # noqa: BLE001
                    info["error"] = f"onnxruntime: {type(e).__name__}: {e}"[:2000]
            out["models"][name]["onnx"] = info
            m.to(dev)
    return out


def markdown(res: dict) -> str:
    s, env = res["settings"], res["env"]
    hw = env.get("gpu") or f"{env['cpu_count']} CPU cores"
    lines = [f"# Inference speed: teacher vs student ({res['profile']} profile, {env['device']})", "",
             (f"Random-init detectors, {s['height']}x{s['width']} generated driving scenes, eval mode, end to end "
              f"(transform + backbone + FPN + head + post-processing). Latency: batch 1, median of {s['runs']}; "
              f"throughput: batch {s['batch']}. amp={s['amp']}. torch {env['torch']}, {hw}, "
              f"{env['torch_threads']} threads; load average at start {env.get('loadavg_at_start', 'n/a')}."), "",
             ("| arch | model | backbone / FPN | params M | GFLOPs | latency ms (b1) | images/s "
              f"(b{s['batch']}) | ONNX Runtime latency ms (b1) | ONNX images/s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, a in res["archs"].items():
        for name, m in a["models"].items():
            o = m.get("onnx")
            if o is None:
                ol, ot = "-", "-"
            elif "latency" in o:
                flag = "" if o.get("parity") in ("OK", None) else f" (parity {o['parity']})"
                ol, ot = f"{o['latency']['median_ms']:.1f}{flag}", f"{o['images_per_s']:.1f}"
            else:
                ol, ot = "n/a", "n/a"
            lines.append(f"| {arch} | {name} | {m['backbone']} / {m['fpn_channels']} | {m['params'] / 1e6:.2f} | "
                         f"{m['gflops']:.2f} | {m['latency']['median_ms']:.1f} | {m['images_per_s']:.1f} | {ol} | "
                         f"{ot} |")
    lines += ["", ("Student / teacher ratios (lower is cheaper for params/GFLOPs/latency; higher is better for "
                   "throughput):"), ""]
    for arch, a in res["archs"].items():
        for bb, r in a["ratios"].items():
            lines.append(f"- {arch} {bb}: " + "; ".join(f"{k} {v:.3f}" for k, v in r.items()))
            o = a["models"][f"student_{bb}"].get("onnx")
            if o and "latency onnx/pytorch" in o:
                lines[-1] += f"; ONNX Runtime / PyTorch latency {o['latency onnx/pytorch']:.3f}"
            elif o and "error" in o:
                lines[-1] += f"; ONNX n/a ({o['error'].splitlines()[0][:160]})"
    lines += ["", "GFLOPs from `torch.utils.flop_counter.FlopCounterMode` (conv/matmul, 2 FLOPs per MAC), one image.",
              "", "Command: `.venv/bin/python benchmarks/speed.py " + " ".join(res.get("argv", [])) + "`"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--device", help="cpu | cuda | auto")
    ap.add_argument("--archs", nargs="+", choices=["retinanet", "fcos", "gfl", "fasterrcnn"])
    ap.add_argument("--teacher")
    ap.add_argument("--teacher-fpn", type=int)
    ap.add_argument("--students", nargs="+")
    ap.add_argument("--student-fpn", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, help="throughput batch size")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out-stem")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    for k, v in PROFILES[args.profile].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    res = {"profile": args.profile, "env": environment(dev), "argv": argv,
           "settings": {k: getattr(args, k) for k in ("archs", "teacher", "teacher_fpn", "students", "student_fpn",
                                                      "height", "width", "batch", "runs", "warmup", "amp", "onnx")},
           "archs": {}}
    images = scene_images(args.batch, args.height, args.width)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="aidkd_speed_") as tmp:
        for arch in args.archs:
            res["archs"][arch] = bench_arch(arch, args, dev, images, Path(tmp))
    res["seconds"] = time.time() - t0
    md = markdown(res)
    jp, mp = write_results(args.out_stem or f"speed_{device_tag(dev)}", res, md)
    print(md)
    print(f"\nwrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
