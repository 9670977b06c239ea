"""CPU time of ``aidkd demo`` (what ``make demo`` runs), fresh, in a temporary folder, under ``/usr/bin/time -v``.

CPU time (user + system) is the measure: on a shared machine wall time says more about the other processes than
about the demo. The record also holds the wall time, the 1-min load average before and after, the torch thread
count the demo chose (it prints it), the commit and the demo's results table.

    .venv/bin/python benchmarks/demo_time.py            # writes benchmarks/results/demo_time.{json,md}
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import source_commit, write_results

TIME_FIELDS = {"user_s": "User time (seconds)", "sys_s": "System time (seconds)",
               "wall": "Elapsed (wall clock) time (h:mm:ss or m:ss)", "max_rss_kb": "Maximum resident set size (kbytes)"}


def parse_time_v(text: str) -> dict:
    """The fields of ``/usr/bin/time -v``'s report this benchmark records (wall clock converted to seconds)."""
    values = {}
    for key, label in TIME_FIELDS.items():
        m = re.search(rf"^\s*{re.escape(label)}: (\S+)\s*$", text, re.MULTILINE)
        if m is None:
            raise ValueError(f"/usr/bin/time -v output has no '{label}'")
        values[key] = m.group(1)
    parts = [float(p) for p in values.pop("wall").split(":")]
    wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"user_s": float(values["user_s"]), "sys_s": float(values["sys_s"]), "wall_s": wall,
            "max_rss_mb": int(values["max_rss_kb"]) / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aidkd", default=str(Path(sys.executable).with_name("aidkd")),
                    help="the aidkd executable (default: the one beside this Python)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary demo folder")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="aidkd_demo_time_"))
    cmd = ["/usr/bin/time", "-v", args.aidkd, "demo", "--out", str(out / "demo")]
    revision = source_commit()  # of the sources the demo runs, before anything can change them
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"aidkd demo failed (exit {proc.returncode})")
    measured = parse_time_v(proc.stderr)
    threads = re.search(r"^torch threads: (\d+)", proc.stdout, re.MULTILINE)
    # the demo's own text names its (temporary) folder: a committed result names no machine path
    table = (out / "demo" / "results.md").read_text().replace(str(out / "demo"), "DEMO_DIR")
    record = {"command": "aidkd demo (fresh folder), under /usr/bin/time -v", "commit": revision,
              "cpu_s": round(measured["user_s"] + measured["sys_s"], 1), **measured,
              "torch_threads": int(threads.group(1)) if threads else None, "cores": len(os.sched_getaffinity(0)),
              "load_avg_1min_before": load_before, "load_avg_1min_after": load_after,
              "date": time.strftime("%Y-%m-%d", time.gmtime(t0)), "results_md": table}
    md = (f"# `aidkd demo`: CPU time\n\n`.venv/bin/python benchmarks/demo_time.py` (a fresh `aidkd demo` under "
          f"`/usr/bin/time -v`), commit {record['commit']}:\n\n"
          f"| CPU s (user + sys) | user s | sys s | wall s | torch threads | cores | 1-min load before / after |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| **{record['cpu_s']:.0f}** | {measured['user_s']:.0f} | {measured['sys_s']:.0f} | "
          f"{measured['wall_s']:.0f} | {record['torch_threads']} | {record['cores']} | "
          f"{load_before:.1f} / {load_after:.1f} |\n\n"
          "Wall time depends on what else the machine runs (the load average); CPU time much less so. The demo's "
          "table (its `train s` column is wall time):\n\n" + table)
    jp, mp = write_results("demo_time", record, md)
    print(md)
    print(f"wrote {jp}, {mp}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
