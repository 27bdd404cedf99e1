"""Does meta-learning the dataset improve with more processes, at a fixed number of outer steps?

    python meta_scaling.py [--world-sizes 1 2 4 8] [--seeds 5] [--out results/meta_scaling] [--set KEY=VALUE]

Each process draws its own classifier every outer step, so N processes average the outer gradient
over N tasks. For every world size and seed this runs `meta_learning.py -c configs/meta_dataset.yaml
--nproc N` (skipping runs already in --out), then writes figure.png / figure.pdf (the learned
points of one seed per world size with sample adapted decision boundaries; post-adaptation
accuracy against world size) and results.md (the table).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from onepass import (
    figures,  # noqa: E402
    meta_learning,  # noqa: E402
    util,  # noqa: E402
)

REPO = Path(__file__).resolve().parent


def run(world_size: int, seed: int, out: Path, overrides: list[str]) -> Path:
    """The run directory of (world size, seed), training it first if it is not there yet."""
    group = out / f"world{world_size}" / f"seed{seed}"
    if not list(group.rglob("metrics.json")):
        command = [sys.executable, str(REPO / "meta_learning.py"), "-c", str(REPO / "configs/meta_dataset.yaml"),
                   "--nproc", str(world_size), "--seed", str(seed), "-l", str(group), "-g", "."]
        for item in overrides:
            command += ["--set", item]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"meta_scaling.py: error: world size {world_size}, seed {seed} failed:\n{result.stderr}")
    return next(group.rglob("metrics.json")).parent


def meta_settings(run_dir: Path) -> dict:
    """The meta-learning settings a run used (its config.json's meta section)."""
    return json.loads((run_dir / "config.json").read_text())["meta"]


def adapted_boundaries(run_dir: Path, count: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The learned dataset, its labels, and `count` fresh classifiers (w1, w2, b) adapted to it."""
    saved = torch.load(run_dir / "learned_dataset.pt", weights_only=True)
    config = meta_settings(run_dir)
    module = meta_learning.learned_dataset_meta_module(
        len(saved["X"]), saved["X"].shape[1], config["inner_steps"], config["inner_lr"],
        torch.Generator().manual_seed(0), torch.Generator().manual_seed(12345), saved["X"].dtype)
    with torch.no_grad():
        module.module.X.copy_(saved["X"])
    module.output = lambda adapted: torch.cat([adapted.w, adapted.b])
    module.eval()
    with torch.no_grad():
        return saved["X"], saved["Y"], [module() for _ in range(count)]


def axis_texts(settings: dict) -> tuple[str, str]:
    """The accuracy axis's label and the summary panel's title, from the runs' own settings."""
    return (f"accuracy after {settings['inner_steps']} inner steps",
            f"{settings['evaluation_tasks']} fresh classifiers,\n{settings['outer_steps']} outer steps")


def figure(results: dict[int, list[tuple[int, float, Path]]], stem: Path) -> list[Path]:
    """Write the figure as stem.png and stem.pdf; returns their paths."""
    sizes = sorted(results)
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(3.2 * (len(sizes) + 1), 3.4))
    for ax, size in zip(axes, sizes, strict=False):
        seed, accuracy, run_dir = sorted(results[size], key=lambda r: r[1])[len(results[size]) // 2]   # median
        points, labels, classifiers = adapted_boundaries(run_dir, 5)
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="coolwarm", s=10, edgecolors="none")
        limit = float(points.abs().max()) * 1.1 + 1e-9
        xs = torch.linspace(-limit, limit, 2, dtype=points.dtype)
        for w1, w2, b in classifiers:
            if abs(float(w2)) > 1e-12:
                ax.plot(xs, -(w1 * xs + b) / w2, color="0.3", linewidth=0.8, alpha=0.7)
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")
        ax.set_title(f"{size} process{'es' if size > 1 else ''}: accuracy {accuracy:.2f}\n"
                     f"(median of the seeds: seed {seed})", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[-1]
    for size in sizes:
        accuracies = [r[1] for r in results[size]]
        ax.scatter([size] * len(accuracies), accuracies, color="tab:blue", s=12, alpha=0.6)
    means = [statistics.mean(r[1] for r in results[size]) for size in sizes]
    ax.plot(sizes, means, color="black", marker="o", label="mean over seeds")
    ax.set(xscale="log", ylim=(0.45, 1.02))
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("processes (tasks per outer step)", fontsize=8)
    ylabel, title = axis_texts(meta_settings(results[sizes[0]][0][2]))     # every run of the study has the same
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figures.save(fig, stem, dpi=130, bbox_inches=None)


def table(results: dict[int, list[tuple[int, float, Path]]]) -> str:
    lines = ["| processes | mean accuracy | s.e. | median | min | max | runs above 0.9 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sorted(results):
        accuracies = [r[1] for r in results[size]]
        se = statistics.stdev(accuracies) / len(accuracies) ** 0.5 if len(accuracies) > 1 else float("nan")
        lines.append(f"| {size} | {statistics.mean(accuracies):.3f} | {se:.3f} | {statistics.median(accuracies):.3f} "
                     f"| {min(accuracies):.3f} | {max(accuracies):.3f} | {sum(a > 0.9 for a in accuracies)}"
                     f"/{len(accuracies)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = util.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..K-1 per world size (default 5)")
    parser.add_argument("--out", type=Path, default=Path("results/meta_scaling"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to meta_learning.py, e.g. --set meta.outer_steps=100 for a quick look")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[tuple[int, float, Path]]] = {}
    for size in args.world_sizes:
        for seed in range(args.seeds):
            run_dir = run(size, seed, args.out, args.overrides)
            accuracy = util.get_tags(run_dir).popitem()[1].metrics["final"]["Meta/Adapted_Accuracy"]
            results.setdefault(size, []).append((seed, accuracy, run_dir))
            print(f"world size {size}, seed {seed}: accuracy {accuracy:.3f}", flush=True)
    figure(results, args.out / "figure")
    summary = table(results)
    util.write_text(args.out / "results.md", summary + "\n")
    print(f"\n{summary}\n\nwrote {args.out / 'figure.png'}, {args.out / 'figure.pdf'}, {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(util.run_command(main))
