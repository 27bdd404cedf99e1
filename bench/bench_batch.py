"""Wall time of the main UCI Energy experiment (9 algorithms x 200 initialisations x 4000 steps),
extrapolated from a slice of it run exactly as a user runs it.

    .venv/bin/python bench/bench_batch.py [--reps 10] [--workers 2]

Runs `run_all.py uci_energy --reps K` into a temporary folder (the first K of the experiment's 200
initialisations, every algorithm), times it, and scales by 200 / K. Prints the mean training
seconds per run of each algorithm too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FULL_REPS = 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="initialisations in the slice (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_batch-") as results:
        start = time.perf_counter()
        subprocess.run([sys.executable, "run_all.py", "uci_energy", "--reps", str(args.reps), "--workers",
                        str(args.workers), "-l", results], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        per_algorithm = defaultdict(list)
        for metrics_file in Path(results).rglob("metrics.json"):
            algorithm = json.loads((metrics_file.parent / "config.json").read_text())["algorithm"]
            per_algorithm[algorithm].append(json.loads(metrics_file.read_text())["train_seconds"])
    runs = sum(len(times) for times in per_algorithm.values())
    full = seconds * FULL_REPS / args.reps
    print(f"slice: {runs} runs in {seconds:.1f} s on {args.workers} workers "
          f"({seconds / runs * args.workers:.2f} worker-seconds per run)")
    print(f"full experiment ({FULL_REPS * len(per_algorithm)} runs), extrapolated: {full / 60:.1f} min "
          f"(target < 60 min: {'met' if full < 3600 else 'MISSED'})")
    for algorithm, times in sorted(per_algorithm.items()):
        print(f"  {algorithm:<22} mean training {statistics.mean(times):.2f} s per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
