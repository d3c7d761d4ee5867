"""Wall time per stage of ``manifold-lab measure`` on the embedded default (goal: < 3 min on 2 cores).

Runs the real CLI once (the default checkpoint must already be cached or it is trained first; the
training time is reported separately) and prints each stage's share of the total.

    python benchmarks/bench_measure.py [--tokenizer vae] [--out /tmp/bench-measure]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="vae")
    ap.add_argument("--out", default="/tmp/manifold-lab-bench-measure")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    exe = Path(sys.executable).parent / "manifold-lab"

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c",
                    f"from manifold_lab.tokenizers import get_pretrained; get_pretrained({args.tokenizer!r})"],
                   check=True)
    prep = time.perf_counter() - t0

    cmd = [str(exe), "measure", "--tokenizer", args.tokenizer, "--out", args.out, "--no-progress"]
    for s in args.set:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0

    meta = json.loads((Path(args.out) / "metrics.json").read_text())["meta"]
    timing = meta["timing_s"]
    print(f"measure --tokenizer {args.tokenizer}: {total:.1f} s wall (process), "
          f"{meta['wall_time_s']:.1f} s inside, torch threads {meta['torch_threads']}")
    print(f"(default checkpoint ready/trained beforehand in {prep:.1f} s)")
    print(f"{'stage':<34}{'seconds':>10}{'share':>8}")
    for stage, sec in timing.items():
        print(f"{stage:<34}{sec:>10.1f}{sec / meta['wall_time_s']:>8.1%}")
    goal = 180.0
    print(f"goal < {goal:.0f} s: {'met' if total < goal else 'NOT met'} (ratio total/goal = {total / goal:.2f})")


if __name__ == "__main__":
    main()
