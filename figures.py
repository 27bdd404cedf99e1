"""Statistics over a results folder's runs, the primitives of the paper's tables and figures.

Runs are grouped by algorithm (config.json's `algorithm`); "Random_3Batched" is derived from the
Random_Validation runs. Every statistic is over the final values of the runs' headline metric;
diverged runs (a non-finite final value, or one at or above the dataset's threshold) are left out
of the statistics and counted.
"""
from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from onepass import results_table, util

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BOOTSTRAP_SAMPLES = 1000
BAYESOPT = "Bayesian optimisation"


@dataclass(frozen=True)
class Summary:
    """Statistics of one algorithm's final values."""
    mean: float
    mean_se: float          # bootstrap standard error
    median: float
    median_se: float
    best: float             # the minimum
    runs: int               # runs in the statistics
    diverged: int           # runs left out


def bootstrap_standard_error(values: np.ndarray, statistic: Callable[..., np.ndarray],
                             samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
    """Standard deviation of `statistic` over `samples` resamples of `values` with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return math.nan
    rows = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
    return float(np.std(statistic(values[rows], axis=1), ddof=1))


def summarise(values: np.ndarray, threshold: float = math.inf, seed: int = 0) -> Summary:
    """Mean and median (each with its bootstrap standard error) and best of the finite values
    below `threshold`; the others count as diverged."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[np.isfinite(values) & (values < threshold)]
    if len(kept) == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, math.nan, 0, len(values))
    return Summary(float(kept.mean()), bootstrap_standard_error(kept, np.mean, seed=seed),
                   float(np.median(kept)), bootstrap_standard_error(kept, np.median, seed=seed),
                   float(kept.min()), len(kept), len(values) - len(kept))


def three_batched_note(runs: int) -> str:
    """What the Random (3-batched) row of a table is built from, and why it may lack a statistic."""
    triples, what = runs // 3, "the test value of the run with the best final validation loss in each"
    if triples == 0:
        return (f"Random (3-batched): {what} random triple of the Random (full validation) runs; {runs} runs make "
                f"no triple, so its row has no value (-).")
    left_over = f" ({runs % 3} left over, dropped)" if runs % 3 else ""
    note = f"Random (3-batched): {what} of {triples} random triples of the {runs} Random (full validation) " \
           f"runs{left_over}."
    return note + (" One triple (fewer than 6 runs) gives one value: no standard error." if triples == 1 else "")


def three_batched(test: np.ndarray, validation: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random (3-batched): the runs in random triples (a leftover one or two are dropped), and from
    each triple the test value of the run with the best final validation loss (a run whose
    validation loss is not finite never wins over one whose is)."""
    test, validation = np.asarray(test, dtype=np.float64), np.asarray(validation, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(test))[:len(test) // 3 * 3].reshape(-1, 3)
    scores = np.where(np.isfinite(validation), validation, np.inf)[order]
    winners = order[np.arange(len(order)), np.argmin(scores, axis=1)]
    return test[winners]


def final_value(run: util.Run, tag: str) -> float:
    """A run's final value of `tag` (from metrics.json; NaN when missing, diverged or failed)."""
    value = run.metrics.get("final", {}).get(tag)
    return math.nan if value is None else float(value)


def final_values_by_algorithm(runs: dict[str, util.Run], tag: str, seed: int = 0) -> dict[str, np.ndarray]:
    """{algorithm: final values of `tag`}, in the paper's order, with Random_3Batched derived from
    the Random_Validation runs (by their final Loss/Validation)."""
    grouped: dict[str, list[util.Run]] = {}
    for run in runs.values():
        grouped.setdefault(run.config.get("algorithm", "?"), []).append(run)
    values = {algorithm: np.array([final_value(run, tag) for run in group]) for algorithm, group in grouped.items()}
    if "Random_Validation" in grouped:
        validation = np.array([final_value(run, "Loss/Validation") for run in grouped["Random_Validation"]])
        values["Random_3Batched"] = three_batched(values["Random_Validation"], validation, seed)
    return dict(sorted(values.items(), key=lambda item: results_table.order_key(item[0])))


# -------------------------------------------------------------------------------------------------
# Tables

def statistics_table(summaries: dict[str, Summary], scale: float = 1.0) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and LaTeX rows of one dataset's table: mean, median (each +- bootstrap s.e.),
    best and diverged count per algorithm. The lowest mean and median, and any within the best's
    standard error of it, are marked (Markdown bold, LaTeX \\textbf)."""
    def finite_or_zero(value: float) -> float:
        return value if math.isfinite(value) else 0.0

    def marked(name: str, value: float, error: float, field: str) -> tuple[str, bool]:
        values = [(getattr(s, field), finite_or_zero(getattr(s, field + "_se"))) for s in summaries.values() if s.runs]
        best, best_error = min(values) if values else (math.nan, 0.0)
        if not math.isfinite(value):
            return "-", False
        text = f"{value * scale:.4g} ± {error * scale:.2g}" if math.isfinite(error) else f"{value * scale:.4g}"
        return text, value <= best + best_error
    header = ["algorithm", "runs", "mean ± s.e.", "median ± s.e.", "best", "diverged"]
    rows, latex = [], []
    for name, summary in summaries.items():
        mean, mean_best = marked(name, summary.mean, summary.mean_se, "mean")
        median, median_best = marked(name, summary.median, summary.median_se, "median")
        best = f"{summary.best * scale:.4g}" if summary.runs else "-"
        shown, runs, diverged = results_table.paper_name(name), str(summary.runs), str(summary.diverged)
        rows.append([shown, runs, f"**{mean}**" if mean_best else mean, f"**{median}**" if median_best else median,
                     best, diverged])
        cells = [shown.replace("_", "\\_").replace("×", "$\\times$"), runs, mean.replace("±", "$\\pm$"),
                 median.replace("±", "$\\pm$"), best, diverged]
        cells[2] = f"\\textbf{{{cells[2]}}}" if mean_best else cells[2]
        cells[3] = f"\\textbf{{{cells[3]}}}" if median_best else cells[3]
        latex.append(" & ".join(cells) + " \\\\")
    return header, rows, latex


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# -------------------------------------------------------------------------------------------------
# Figures: one colour, line style and marker per algorithm everywhere.

LINE_STYLES = ("-", "--", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)))   # the last dash-dot-dot: dots fade in light shades
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
MARKERS_PER_CURVE = 8


def place(algorithm: str) -> int:
    """An algorithm's fixed index into the palette and the style cycles; unknown names by a stable
    checksum (Python's str hash differs from process to process)."""
    order = results_table.ALGORITHM_ORDER
    return order.index(algorithm) if algorithm in order else zlib.crc32(algorithm.encode())


def colour(algorithm: str) -> tuple | str:
    if algorithm == BAYESOPT:
        return "black"
    palette = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors    # more algorithms than 20 colours
    return palette[place(algorithm) % len(palette)]


def line_style(algorithm: str, position: int = 0, count: int = 1, points: int = 1) -> dict:
    """Keywords of `algorithm`'s curve, the `position`th of `count` on its axes, of `points` points.
    Curves can coincide (on UCI Energy, Random, Random_Validation, Lorraine and Baydin_Exact nearly
    do), so beside its colour each has a line style and a hollow marker of its own (hollow markers
    of different shapes at one point all show), markers staggered by position along long curves,
    and solid lines under dashed ones, whose gaps show what lies beneath."""
    index, every = place(algorithm), max(1, points // MARKERS_PER_CURVE)
    style = index % len(LINE_STYLES)
    return {"color": colour(algorithm), "linestyle": LINE_STYLES[style], "zorder": 2 + 0.1 * style,
            "marker": MARKERS[index % len(MARKERS)], "markevery": (position * every // max(count, 1), every),
            "markerfacecolor": "none", "markersize": 4.5, "linewidth": 1.3, "alpha": 0.9,
            "label": results_table.paper_name(algorithm)}


def new_figure(width: float = 7.0, height: float = 3.4) -> tuple[plt.Figure, plt.Axes]:
    figure, axes = plt.subplots(figsize=(width, height), layout="constrained")
    axes.grid(alpha=0.3)
    return figure, axes


def outside_legend(axes: plt.Axes) -> None:
    """The legend to the right of the axes, so that it covers no data."""
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, frameon=False)


def save(figure: plt.Figure, path: Path, **options: Any) -> list[Path]:
    """Write `path` as PNG and PDF (by default cropped to what is drawn, legends outside the axes
    included; `options` are savefig's), each atomically: a link planted at either name is replaced,
    not followed. Returns both paths."""
    options = {"dpi": 150, "bbox_inches": "tight"} | options
    written = []
    for suffix in (".png", ".pdf"):
        target = path.with_suffix(suffix)
        util.atomic_write(target, functools.partial(figure.savefig, format=suffix[1:], **options))
        written.append(target)
    plt.close(figure)
    return written


def plottable_cdfs(values: dict[str, np.ndarray]) -> bool:
    """Whether some algorithm has the 2 finite values a CDF needs to be more than a point."""
    return any(np.isfinite(data).sum() >= 2 for data in values.values())


def plot_cdfs(axes: plt.Axes, values: dict[str, np.ndarray], xlabel: str) -> None:
    """Empirical CDF of each algorithm's final values (finite ones; log x-axis)."""
    shown = {algorithm: np.sort(data[np.isfinite(data)]) for algorithm, data in values.items()}
    shown = {algorithm: finite for algorithm, finite in shown.items() if len(finite)}
    for position, (algorithm, finite) in enumerate(shown.items()):
        axes.step(finite, np.arange(1, len(finite) + 1) / len(values[algorithm]), where="post",
                  **line_style(algorithm, position, len(shown), len(finite)))
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("fraction of runs at or below")
    outside_legend(axes)


def bootstrap_median_band(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of values[run, step]: the median, 16th and 84th percentiles of `samples`
    bootstrap medians over the runs (NaN entries, runs that ended earlier, ignored)."""
    rows = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
    band = np.full((3, values.shape[1]), np.nan)
    block = max(1, 2**23 // max(rows.size, 1))          # columns per chunk: bounded memory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no values at all gives NaN
        for start in range(0, values.shape[1], block):
            medians = nanmedian(values[:, start:start + block][rows], axis=1)
            band[:, start:start + block] = np.nanpercentile(medians, [50, 16, 84], axis=0)
    return band[0], band[1], band[2]


def nanmedian(values: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmedian by sorting (NaNs sort last); NaN where a slice has no value. NumPy's own goes
    through masked arrays along a short axis, some 15 times slower on the bootstrap's resamples."""
    ordered = np.sort(values, axis=axis)
    count = np.expand_dims((~np.isnan(values)).sum(axis=axis), axis)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=axis)
    high = np.take_along_axis(ordered, np.minimum(count // 2, ordered.shape[axis] - 1), axis=axis)
    return np.squeeze(np.where(count > 0, (low + high) / 2, np.nan), axis=axis)


def plot_envelopes(axes: plt.Axes, curves: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str,
                   ylabel: str) -> None:
    """Each algorithm's bootstrap median of its curves (x, values[run, x]), with the central 68% of
    the bootstrap medians as a band; log y. Drawn only where every run of the algorithm has a value
    (a diverged run's are +inf from its divergence on): a median over a set of runs that shrinks as
    runs end would jump. Algorithms without a value are left out."""
    shown = {algorithm: curve for algorithm, curve in curves.items() if has_values(curve[1])}
    for position, (algorithm, (x, values)) in enumerate(shown.items()):
        every_run = ~np.isnan(values).any(axis=0)
        centre, low, high = (np.where(every_run & np.isfinite(line), line, np.nan)
                             for line in bootstrap_median_band(values))
        axes.plot(x, centre, **line_style(algorithm, position, len(shown), len(x)))
        axes.fill_between(x, low, high, color=colour(algorithm), alpha=0.15, linewidth=0)
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    outside_legend(axes)


def has_values(values: np.ndarray) -> bool:
    """Whether curves values[run, x] hold a finite value to draw."""
    return values.size > 0 and bool(np.isfinite(values).any())


def on_time_grid(runs: list[util.Run], tag: str, points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Each run's `tag` against its elapsed wall time, on a common grid: values[run, time], a row
    per run (NaN after a run ends, and throughout for a run without the tag)."""
    curves = [(s.wall_times - s.wall_times[0], s.values) if s is not None and len(s.steps) else None
              for s in (run.scalars.get(tag) for run in runs)]
    end = max((curve[0][-1] for curve in curves if curve is not None), default=0.0)
    grid = np.linspace(0.0, end, points)
    values = np.array([np.interp(grid, *curve, right=np.nan) if curve is not None else np.full(points, np.nan)
                       for curve in curves]).reshape(len(runs), points)
    return grid, values


def plot_trajectories(axes: plt.Axes, runs: list[util.Run], tag: str, count: int = 20, seed: int = 0) -> None:
    """`count` randomly chosen runs' trajectories of `tag` (a Last_* tag of each hyperparameter step,
    e.g. Last_Hyperparameter/Lr) against the weight step that ends each window, log y: algorithms
    with windows of other lengths (Baydin's one-step windows) share the x axis."""
    chosen = np.random.default_rng(seed).permutation(len(runs))[:count]
    for index in chosen:
        scalar, steps = runs[index].scalars.get(tag), runs[index].config.get("network_weight_steps", 1)
        if scalar is not None:
            axes.plot((scalar.steps + 1) * steps, scalar.values, linewidth=0.8, alpha=0.8)
    axes.set_yscale("log")


def trajectory_panels(groups: dict[str, list[util.Run]], tag: str, ylabel: str, columns: int = 3) -> plt.Figure:
    """One panel of sample trajectories of `tag` per algorithm, at most `columns` to a row (one
    wide strip of panels is unreadable)."""
    columns = min(columns, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure, panels = plt.subplots(rows, columns, figsize=(2.8 * columns, 2.3 * rows), layout="constrained",
                                  squeeze=False)
    for axes, (algorithm, runs) in zip(panels.flat, groups.items(), strict=False):
        plot_trajectories(axes, runs, tag)
        axes.set_title(results_table.paper_name(algorithm), fontsize=8)
        axes.grid(alpha=0.3)
    for axes in panels.flat[len(groups):]:
        axes.set_visible(False)
    figure.supxlabel("weight step", fontsize=9)
    figure.supylabel(ylabel, fontsize=9)
    return figure


def plot_violins(axes: plt.Axes, values: dict[str, np.ndarray], ylabel: str) -> None:
    """Each algorithm's distribution of `values` (finite ones; algorithms with none left out)."""
    finite = {name: data[np.isfinite(data)] for name, data in values.items()}
    names = [name for name, data in finite.items() if len(data)]
    parts = axes.violinplot([finite[name] for name in names], showmedians=True)
    for body, name in zip(parts["bodies"], names, strict=True):
        body.set(facecolor=colour(name), edgecolor=colour(name), alpha=0.5)
    for lines in ("cbars", "cmins", "cmaxes", "cmedians"):
        parts[lines].set_color([colour(name) for name in names])
    axes.set_xticks(range(1, len(names) + 1), [results_table.paper_name(name) for name in names], rotation=45,
                    ha="right", fontsize=7)
    axes.set_ylabel(ylabel)


def plot_heatmap(axes: plt.Axes, grid: np.ndarray, xlabel: str, ylabel: str, label: str) -> None:
    """grid[row = T - 1, column = i - 1] (NaN where no runs), log colour scale, integer ticks. The
    cells need not be square: an axes shrunk to square ones leaves a long x label under the colour bar."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator
    finite = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(finite.min(), finite.max()) if len(finite) else None
    image = axes.imshow(grid, origin="lower", norm=norm, cmap="viridis", aspect="auto",
                        extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
    axes.figure.colorbar(image, ax=axes, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(False)
