"""The train stage's step time with torch's thread count from the thread policy, against fixed counts.

    python bench/threads.py                    # tiny UNet, LoRA r4, batch 8, 128 px, 2 reader threads
    python bench/threads.py --steps 20 --workers 0

The case is bench/train_step.py's (the train stage on the tiny model; the step time is the median
interval between its progress marks after 3 warm-up steps: under load a step's time swings by
seconds, which a long-minus-short difference does not survive), run in a fresh process per setting: OMP_NUM_THREADS unset (the policy of training/threads.py picks the count),
then OMP_NUM_THREADS=1 and =N for N up to the usable cores (torch's own default is every physical core).
The load average is printed before and after: the same case is meant to be run on an idle and on a
loaded machine. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Marks:
    """A reporter (its `track`) that records when each training step ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    @contextlib.contextmanager
    def track(self, description: str, total, **options):
        yield (lambda n=1, **fields: self.times.append(time.perf_counter())) if description == "train" else (
            lambda n=1, **fields: None)


def child(steps: int, batch: int, size: int, workers: int) -> dict:
    import statistics

    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from train_step import stage_seconds

    marks = Marks()
    with tempfile.TemporaryDirectory() as tmp:
        stage_seconds(Path(tmp) / "run", 3 + steps, batch, size, loader_workers=workers, reporter=marks)
    intervals = [b - a for a, b in zip(marks.times[2:], marks.times[3:])]
    # The stage set the count (or left it): what the steps ran with.
    return {"s_step": statistics.median(intervals), "mean_s_step": statistics.fmean(intervals),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="the loader's reader threads (train.loader_workers)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.batch, args.size, args.workers)))
        return
    sys.path.insert(0, str(REPO))
    from sdxlpipe.training.threads import torch_threads, usable_cores

    cores = usable_cores()
    settings = [("policy", None), *((str(n), str(n)) for n in range(1, cores + 1))]
    load_before = os.getloadavg()
    rows = []
    for name, omp in settings:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if omp is not None:
            env["OMP_NUM_THREADS"] = omp
        env["PYTHONPATH"] = str(REPO)
        cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--batch", str(args.batch),
               "--size", str(args.size), "--workers", str(args.workers)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((name, json.loads(proc.stdout.strip().splitlines()[-1])))
        print(name, rows[-1][1], file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"tiny UNet, LoRA r4, batch {args.batch}, {args.size} px, {args.workers} reader threads, {args.steps} steps; "
          f"usable cores {cores}, the rule gives {torch_threads(cores, args.workers)} torch thread(s)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print("| torch threads set by | threads | ms/step (median) | mean | vs policy |")
    print("|---|---|---|---|---|")
    policy = next((r["s_step"] for n, r in rows if n == "policy"), None)
    for name, r in rows:
        ratio = f"{r['s_step'] / policy:.2f}x" if policy else "-"
        label = "the policy (OMP_NUM_THREADS unset)" if name == "policy" else f"OMP_NUM_THREADS={name}"
        print(f"| {label} | {r['torch_threads']} | {r['s_step'] * 1000:.1f} | {r['mean_s_step'] * 1000:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
