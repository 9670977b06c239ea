"""benchmarks/gpu_smoke.sh runs its GPU code path on a CPU with --cpu --tiny (install check, every variant, the
profiler split, the result files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_smoke_runs_tiny_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_smoke.sh"), "--cpu", "--tiny", "--out", str(tmp_path)],
                          check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_smoke_cpu_tiny.json").read_text())
    assert list(res["variants"]) == ["student", "kd", "kd_aid_instance"]
    assert res["precision"] == "float32" and res["settings"]["batch"] == 2
    for r in res["variants"].values():
        assert r["steps"] >= 2 and r["images_per_s"] > 0
        assert 0.0 <= r["host_share"] <= 1.0 and abs(r["host_share"] + r["conv_share"] - 1) < 1e-9
    assert "| kd_aid_instance |" in (tmp_path / "gpu_smoke_cpu_tiny.md").read_text()
