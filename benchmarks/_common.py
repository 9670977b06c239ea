"""Helpers shared by the benchmark scripts: device choice, environment record, fixed batches, result files."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from aidkd.data.kitti import KITTI_DEFAULT_CLASSES, KITTI_DEFAULT_IGNORE

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Label convention (docs/architecture.md): dataset class i -> label i + 1, 0 = background.
KITTI_CLASSES = list(KITTI_DEFAULT_CLASSES)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    return dev


def device_tag(dev: torch.device) -> str:
    return "gpu" if dev.type == "cuda" else "cpu"


def environment(dev: torch.device) -> dict:
    import torchvision

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(dev), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    try:
        env["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return env


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def summarize(times: list[float]) -> dict:
    """Median / quartiles / min / mean of a list of seconds, reported in milliseconds."""
    ms = sorted(t * 1000.0 for t in times)
    if not ms:
        return {"n": 0}
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"n": len(ms), "median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": ms[0],
            "mean_ms": statistics.fmean(ms)}


def synth_batches(root: Path, num_batches: int, batch_size: int, height: int, width: int, seed: int = 0,
                  train: bool = True) -> list[tuple[list[torch.Tensor], list[dict]]]:
    """Fixed batches of generated driving scenes (hard + mislabelled instances on), resized as the engine does."""
    from aidkd.data import DetectionDataset, collate_fn, generate_synth, load_kitti_records

    n = num_batches * batch_size
    done = root / ".complete"
    if not done.exists():
        generate_synth(root, num_images=max(n, 2), seed=seed, width=width, height=height, hard_fraction=0.2,
                       mislabel_fraction=0.05)
        done.write_text("ok\n")
    records = load_kitti_records(root, split="all")
    while len(records) < n:  # tiny sets: repeat
        records = records + records
    ds = DetectionDataset(records[:n], KITTI_CLASSES, list(KITTI_DEFAULT_IGNORE),
                          min_size=height, max_size=width, train=train, hflip_prob=0.0)
    return [collate_fn([ds[b * batch_size + i] for i in range(batch_size)]) for b in range(num_batches)]


def to_device(batch, dev: torch.device):
    images, targets = batch
    return ([im.to(dev) for im in images],
            [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets])


def portable(text: str) -> str:
    """Paths in committed results relative to the repository (``../shared/...`` beside it), not this machine's."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


def source_commit(repo: Path | None = None) -> str:
    """The checkout's commit (12 hex digits), with a note when its tracked files differ from it ('unknown' outside
    git): what a results file names as the code it was written by."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo or REPO), *cmd], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        sha, changed = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha[:12] + (" with uncommitted changes" if changed else "")


def write_results(stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jp, mp = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    jp.write_text(portable(json.dumps(data, indent=2, default=float)) + "\n")
    mp.write_text(markdown.rstrip() + "\n")
    return jp, mp


def fmt(x, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}"
