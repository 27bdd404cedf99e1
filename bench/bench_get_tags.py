"""Time to read a results folder with util.get_tags: 2000 runs of 4000 weight steps, uncached and cached.

    .venv/bin/python bench/bench_get_tags.py [--runs 2000] [--uncached-sample 100]

Logs one real UCI Energy run (Ours_LR_Momentum, 400 x 10 steps, every scalar at the default
cadence, with log_every = 1 for 4000 per-step entries), then makes a folder of `--runs` runs that
share its event file (hard links; each run has its own config.json and metrics.json). Reads a
sample of them uncached (extrapolated to all), then all of them twice: the first pass writes
each run's cache, the second reads only caches.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from onepass import train, util


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--uncached-sample", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_get_tags-") as temporary:
        source_root, results = Path(temporary) / "source", Path(temporary) / "results"
        assert train.main(["-c", str(REPO / "configs/diabetes.yaml"), str(REPO / "configs/Ours_LR_Momentum.yaml"),
                           "--seed", "0", "--set", "log_every=1", "-l", str(source_root)]) == 0
        (source,) = util.find_runs(source_root)
        (events,) = source.glob("events.out.tfevents.*")
        for index in range(args.runs):
            run_dir = results / f"run_{index:05d}"
            run_dir.mkdir(parents=True)
            os.link(events, run_dir / events.name)
            for name in ("config.json", "metrics.json"):
                shutil.copy(source / name, run_dir / name)
        runs = util.get_tags(source_root, use_cache=False)
        steps = len(next(iter(runs.values())).scalars["Loss/Training"].steps)
        tags = len(next(iter(runs.values())).scalars)

        sample = min(args.runs, args.uncached_sample)
        start = time.perf_counter()
        for index in range(sample):
            util.read_run_events(results / f"run_{index:05d}", use_cache=False)
        uncached = (time.perf_counter() - start) * args.runs / sample
        start = time.perf_counter()
        util.get_tags(results)
        first = time.perf_counter() - start
        start = time.perf_counter()
        runs = util.get_tags(results)
        cached = time.perf_counter() - start
    print(f"{len(runs)} runs, {tags} scalar tags each, {steps} entries of Loss/Training per run")
    print(f"uncached (extrapolated from {min(args.runs, args.uncached_sample)} runs): {uncached:.1f} s")
    print(f"first read, writing the caches: {first:.1f} s")
    print(f"cached read: {cached:.1f} s ({cached / len(runs) * 1000:.2f} ms per run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
