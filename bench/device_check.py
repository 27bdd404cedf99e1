"""The device check: correctness and speed of the CUDA paths on this machine's GPUs, as a report.

    python bench/device_check.py [--device cuda] [--out FILE] [--parts ...] [--windows N]

bench/device_check.sh installs what it needs and runs this. Parts, each under a time limit:
- tests: tests/test_hypergradients.py and tests/test_loop_ground_truth.py (every algorithm's
  hypergradient against its ground truth, float64) with ONEPASS_TEST_DEVICE set to the device;
- devices: every algorithm, float64, a short diabetes run on the CPU and on the device: the
  final metrics and hyperparameters must agree (to 1e-6 relative);
- ranks: 2 ranks equal 1 rank on the device. With 2 GPUs or more: `train.py --nproc 2 -d cuda`
  (NCCL, a GPU per rank). With one GPU: 2 processes sharing it over gloo on CUDA tensors (NCCL
  refuses two ranks on one GPU), which checks the collectives' device handling but not NCCL;
- speed: steps/s of Random and Ours_LR_Momentum on Fashion-MNIST, CIFAR-10 (ResNet-18, batch
  100, synthetic images) and Penn Treebank (650-unit LSTM, synthetic tokens), N windows of 10
  steps after a one-window warm-up, and the peak GPU memory of each run.
`--device cpu` runs the same parts on the CPU, small, so that the script cannot rot unnoticed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from bench import bench_workloads
from onepass import config, distributed, train

ALGORITHMS = ["Random", "Ours_LR", "Ours_LR_Momentum", "Ours_HDLR_Momentum", "Lorraine", "Baydin", "Baydin_Exact",
              "DiffThroughOpt"]
PARTS = ["tests", "devices", "ranks", "speed"]
SMALL = ["dtype=float64", "seed=0", "model.layer_sizes=[10, 8, 1]", "batch_size=32", "hyperparameter_steps=5"]


def diabetes(algorithm: str, device: str, log_root: str, *overrides: str) -> config.Config:
    return config.load_from([str(REPO / "configs" / "diabetes.yaml"), str(REPO / "configs" / f"{algorithm}.yaml")],
                            overrides=[*SMALL, f"device={device}", f"log_root={log_root}", *overrides])


def disagreement(got: dict, expected: dict) -> float:
    """The largest relative difference between two runs' final metrics and hyperparameters."""
    worst = 0.0
    for tag, value in expected.items():
        other = got.get(tag)
        if value is None or other is None:
            worst = max(worst, 0.0 if value is other else float("inf"))
        else:
            worst = max(worst, abs(other - value) / max(abs(value), 1e-12))
    return worst


def part_tests(device: str, limit: float, lines: list[str]) -> bool:
    """The ground-truth tests with their learners on `device`."""
    files = ["tests/test_hypergradients.py", "tests/test_loop_ground_truth.py"]
    environment = os.environ | {"ONEPASS_TEST_DEVICE": device}
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=REPO,
                                env=environment, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        lines.append(f"- ground-truth tests on {device}: TIMED OUT after {limit:.0f} s")
        return False
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
    lines.append(f"- ground-truth tests on {device} (ONEPASS_TEST_DEVICE={device} pytest {' '.join(files)}): "
                 f"{'PASS' if result.returncode == 0 else 'FAIL'}: {summary}")
    if result.returncode != 0:
        failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        lines += [f"    {line[:300]}" for line in failed[:30]]
    return result.returncode == 0


def part_devices(device: str, log_root: str, lines: list[str]) -> bool:
    """Every algorithm on the CPU and on `device`: the same run, so the same final values."""
    ok = True
    for algorithm in ALGORITHMS:
        _, on_cpu = train.train(diabetes(algorithm, "cpu", log_root))
        _, on_device = train.train(diabetes(algorithm, device, log_root))
        worst = disagreement(on_device["final"], on_cpu["final"])
        passed = worst <= 1e-6 and on_device["status"] == on_cpu["status"] == "completed"
        ok &= passed
        lines.append(f"- {algorithm}: {device} vs cpu, float64, 50 steps: largest relative difference "
                     f"{worst:.2e} {'PASS' if passed else 'FAIL'}")
    return ok


def _shared_gpu_rank(rank: int, world_size: int, port: int, algorithm: str, log_root: str, out: str) -> None:
    """One of 2 processes on one GPU, over gloo (which takes CUDA tensors; NCCL needs a GPU each)."""
    import torch.distributed as dist
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    context = distributed.Context(rank, world_size, torch.device("cuda", 0))
    _, metrics = train.train(diabetes(algorithm, "cuda", log_root), context=context, show_progress=False)
    if rank == 0:
        Path(out).write_text(json.dumps(metrics["final"]))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_ranks(device: str, log_root: str, lines: list[str]) -> bool:
    """2 ranks equal 1 rank on `device` (NCCL with 2 GPUs; else gloo, both on one GPU or the CPU)."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    ok = True
    for algorithm in ["Ours_LR_Momentum", "DiffThroughOpt"]:
        _, one = train.train(diabetes(algorithm, device, log_root))
        if device == "cpu" or gpus >= 2:
            how = "train.py --nproc 2 (NCCL, one GPU per rank)" if gpus >= 2 else "train.py --nproc 2 (gloo, CPU)"
            runs = Path(log_root) / f"ranks-{algorithm}"
            settings = [a for o in [*SMALL, f"device={device}"] for a in ("--set", o)]
            command = [sys.executable, "train.py", "-c", "configs/diabetes.yaml", f"configs/{algorithm}.yaml",
                       "--nproc", "2", "-l", str(runs), *settings]
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
            if result.returncode != 0:
                lines.append(f"- {algorithm}: {how}: FAILED (exit {result.returncode}): "
                             f"{result.stderr.strip().splitlines()[-1:] or ''}")
                ok = False
                continue
            two = json.loads(next(runs.rglob("metrics.json")).read_text())["final"]
        else:
            how = "2 processes sharing GPU 0 over gloo (NCCL refuses 2 ranks on one GPU; NCCL itself NOT checked)"
            out = str(Path(log_root) / f"shared-{algorithm}.json")
            torch.multiprocessing.spawn(_shared_gpu_rank, args=(2, free_port(), algorithm, log_root, out), nprocs=2)
            two = json.loads(Path(out).read_text())
        worst = disagreement(two, one["final"])
        passed = worst <= 1e-8
        ok &= passed
        lines.append(f"- {algorithm}: 2 ranks vs 1 on {device}, {how}: largest relative difference {worst:.2e} "
                     f"{'PASS' if passed else 'FAIL'}")
    return ok


def part_speed(device: str, windows: int, log_root: str, lines: list[str], deadline: float) -> bool:
    """Steps/s and peak GPU memory of the workloads, at their real sizes (CPU: a token run)."""
    with tempfile.TemporaryDirectory(prefix="device_check-") as temporary:
        data = Path(temporary)
        fashion = REPO.parent / "shared" / "data"
        workloads = ["fashion_mnist"] if fashion.is_dir() else []
        bench_workloads.prepare_data(data, workloads)
        if not workloads:             # no raw data here: synthetic images of Fashion-MNIST's shape
            rng = np.random.default_rng(0)
            np.savez(data / "fashion_mnist.npz", inputs=rng.integers(0, 256, (70000, 784), dtype=np.uint8),
                     targets=rng.integers(0, 10, (70000, 1), dtype=np.uint8), test_size=10000)
        lines.append(f"{windows * 10} timed steps after a 10-step warm-up; Fashion-MNIST "
                     f"{'real' if workloads else 'synthetic'} data\n")
        lines.append("| workload | algorithm | steps/s | peak GPU memory (MiB) |\n|---|---|---|---|")
        for workload in bench_workloads.WORKLOADS:
            for algorithm in bench_workloads.ALGORITHMS:
                if time.monotonic() > deadline:
                    lines.append(f"| {workload} | {algorithm} | skipped: out of time | |")
                    continue
                overrides = [f"dataset.data_dir={data}", f"log_root={log_root}", "seed=0", f"device={device}"]
                if device == "cpu":       # a token run of the same code
                    overrides += ["dataset.test_batch_size=100"] if workload == "cifar10" else []
                files = bench_workloads.files(workload, algorithm)
                train.train(config.load_from(files, overrides=[*overrides, "hyperparameter_steps=1"]),
                            show_progress=False)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                _, metrics = train.train(config.load_from(files, overrides=[*overrides,
                                                                            f"hyperparameter_steps={windows}"]),
                                         show_progress=False)
                peak = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.startswith("cuda") else "n/a")
                lines.append(f"| {workload} | {algorithm} | {metrics['weight_steps'] / metrics['train_seconds']:.1f} "
                             f"| {peak} |")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a small run of the same code)")
    parser.add_argument("--out", default=None, help="the report (default: $OUT/device_check.md if OUT is set, "
                                                    "else bench/device_check_results.md)")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=PARTS, help="parts to run (default: all)")
    parser.add_argument("--windows", type=int, default=None,
                        help="timed windows of 10 steps per speed run (default 20 on a GPU, 1 on the CPU)")
    parser.add_argument("--budget", type=float, default=360, help="seconds for all parts (default 360)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "device_check.md" if os.environ.get("OUT")
                                           else REPO / "bench" / "device_check_results.md")
    start = time.monotonic()
    windows = args.windows or (20 if args.device.startswith("cuda") else 1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_check.py: error: CUDA is not available to this Python (torch "
              f"{torch.__version__}); install the CUDA build of torch, or use --device cpu", file=sys.stderr)
        return 2
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else "none"
    lines = [f"# Device check ({args.device})", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {gpus}; "
             f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}", ""]
    ok = True
    log_root = tempfile.mkdtemp(prefix="device_check-runs-")
    try:
        for part in args.parts:
            began = time.monotonic()
            lines.append(f"## {part}")
            try:
                if part == "tests":
                    ok &= part_tests(args.device, max(60.0, args.budget * 0.4), lines)
                elif part == "devices":
                    ok &= part_devices(args.device, log_root, lines)
                elif part == "ranks":
                    ok &= part_ranks(args.device, log_root, lines)
                else:
                    ok &= part_speed(args.device, windows, log_root, lines, start + args.budget)
            except Exception as error:       # report it, and go on with the next part
                lines.append(f"- {part}: ERROR {type(error).__name__}: {str(error)[:500]}")
                ok = False
            lines.append(f"({part}: {time.monotonic() - began:.0f} s)\n")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines) + "\n")      # what is done so far survives a timeout
    finally:
        shutil.rmtree(log_root, ignore_errors=True)
    lines.append(f"Overall: {'PASS' if ok else 'FAIL'} in {time.monotonic() - start:.0f} s")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    print(f"(written to {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
