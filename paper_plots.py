"""The paper's tables and figures from a results folder, and a report that puts them together.

    python paper_plots.py runs/paper [--out DIR]

Reads every run below the folder (util.get_tags; cached per run), groups the runs by experiment
(the first folder level, as run_all.py writes them; the whole folder when it is a flat list of
runs) and dataset, and writes into --out (default: <folder>/paper) whatever the data supports:
- per experiment and dataset: the results table (Markdown and LaTeX), the CDF of final test
  values, loss envelopes against weight step and wall time, sample learning-rate trajectories
  and run-time violins;
- for runs in Update{T}_Rollback{i} groups: the sensitivity study's median final test value over
  T and i, and (where Ours and Diff-through-Opt ran from the same points) the relative error of
  the first implicit hypergradient against the unrolled one;
- per experiment and dataset whose algorithms ran from the same draws: the head-to-head
  (head_to_head.py: which ends lower from the same start, how often, with a sign test);
and report.md, which shows them with a line on each. What it cannot make is listed with the reason.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onepass import figures, head_to_head, results_table, util
from onepass.schema import ConfigError

ERROR_FLOOR = 1e-7        # relative errors drawn on a log scale: exact agreement shows at this floor
LR = "Last_Hyperparameter/Lr"
# What a figure calls the tags it shows: a raw TensorBoard tag is no axis label.
LABELS = {"Unnormalised_Loss/Test": "test MSE (target units)", "Perplexity/Test": "test perplexity",
          "Loss/Test": "test loss", LR: "learning rate"}


def headline(dataset: str) -> tuple[str, str]:
    """The metric a dataset is judged by (its final value), and its axis label."""
    if dataset.startswith("uci_"):
        tag = "Unnormalised_Loss/Test"
    elif dataset.startswith("penn_treebank"):
        tag = "Perplexity/Test"
    else:
        tag = "Loss/Test"
    return tag, f"final {LABELS[tag]}"


def curve_metric(dataset: str) -> tuple[str, str]:
    """The metric of a dataset's loss curves, and its axis label: the headline's, but the test loss
    (the log of the perplexity) for Penn Treebank."""
    tag = headline(dataset)[0]
    tag = "Loss/Test" if tag == "Perplexity/Test" else tag
    return tag, LABELS[tag]


@dataclass
class Report:
    out: Path
    sections: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, title: str, line: str, files: list[Path] = (), text: str = "") -> None:
        parts = [f"### {title}", line]
        parts += [f"![{title}]({path.name})" for path in files if path.suffix == ".png"]
        parts += [text] if text else []
        self.sections.append("\n\n".join(parts))

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"- {what}: {why}")

    def write(self, source: Path) -> Path:
        lines = [f"# Results: {source}", *self.sections]
        if self.skipped:
            lines += ["## Not made", "\n".join(self.skipped)]
        path = self.out / "report.md"
        util.write_text(path, "\n\n".join(lines) + "\n")
        return path


FINISHED = ("completed", "diverged")
HPO = "hyperparameter_optimisation"
# What the tables and figures read of a finished run's files, by its task.
CONFIG_SHAPES = {HPO: {"dataset.name": str, "algorithm": str, "seed": util.SEED, "hyperparameter_steps": int,
                       "optimiser.lr": util.NUMBER, "optimiser.weight_decay": util.NUMBER},
                 "meta_dataset": {"seed": util.SEED}}
METRICS_SHAPES = {HPO: {"final": dict}, "meta_dataset": {"final": dict, "world_size": int}}


def readable_runs(runs: util.Runs, report: Report) -> dict[str, util.Run]:
    """The runs whose files hold what the figures read. A finished run whose config.json or
    metrics.json does not is skipped, with a line on stderr naming the file; it and the runs
    get_tags could not read are listed in the report."""
    for run_dir, reason in runs.skipped:
        report.skip(f"the run {run_dir}", reason)
    kept = {}
    for name, run in runs.items():
        try:
            check_finished_run(run)
            kept[name] = run
        except util.UnreadableFile as error:
            print(f"paper_plots.py: skipped the run {run.path}: {error}", file=sys.stderr)
            report.skip(f"the run {run.path}", str(error))
    return kept


def check_finished_run(run: util.Run) -> None:
    """UnreadableFile naming the file unless a finished run's files hold what its task's figures read."""
    if run.metrics.get("status") not in FINISHED:
        return
    util.require_shape(run.config, {"task?": str}, run.path / "config.json")
    task = run.config.get("task", HPO)
    util.require_shape(run.config, CONFIG_SHAPES.get(task, {}), run.path / "config.json")
    util.require_shape(run.metrics, METRICS_SHAPES.get(task, {}), run.path / "metrics.json")


def group_runs(runs: dict[str, util.Run]) -> dict[tuple[str, str], list[util.Run]]:
    """{(experiment, dataset): runs} of the finished hyperparameter-optimisation runs."""
    groups: dict[tuple[str, str], list[util.Run]] = {}
    for name, run in runs.items():
        if run.config.get("task", HPO) != HPO or run.metrics.get("status") not in FINISHED:
            continue
        parts = Path(name).parts
        experiment = parts[0] if len(parts) >= 4 else "runs"
        groups.setdefault((experiment, run.config["dataset"]["name"]), []).append(run)
    return groups


def setting_of(run: util.Run) -> tuple[int, int] | None:
    """(T, i) of a run in a sensitivity-study group, else None."""
    for part in run.path.parts:
        if part.startswith("Update") and "_Rollback" in part:
            steps, terms = part.removeprefix("Update").split("_Rollback")
            return int(steps), int(terms)
    return None


def changes(run: util.Run, tag: str) -> bool:
    """Whether a run's `tag` takes more than one value."""
    return tag in run.scalars and len(np.unique(run.scalars[tag].values)) > 1


def main_figures(report: Report, prefix: str, title: str, runs: list[util.Run], dataset: str) -> None:
    tag, label = headline(dataset)
    runs_by_algorithm: dict[str, list[util.Run]] = {}
    for run in sorted(runs, key=lambda run: results_table.order_key(run.config["algorithm"])):
        runs_by_algorithm.setdefault(run.config["algorithm"], []).append(run)
    finals = figures.final_values_by_algorithm({str(i): run for i, run in enumerate(runs)}, tag)
    statistics_section(report, prefix, title, label, finals, len(runs_by_algorithm.get("Random_Validation", ())))

    if figures.plottable_cdfs(finals):
        figure, axes = figures.new_figure()
        figures.plot_cdfs(axes, finals, label)
        axes.set_title(f"{title}: {label} ({count_note(runs_by_algorithm)})", fontsize=9)
        report.add(f"{title}: CDF", f"Empirical CDF of the {label} of every run, per algorithm.",
                   figures.save(figure, report.out / f"{prefix}_cdf"))
    else:
        report.skip(f"{title}: CDF", "no algorithm has 2 runs with a finite final value (the CDF of one run is "
                    "a single point)")

    envelope_figures(report, prefix, title, runs_by_algorithm, dataset)

    tuned = {algorithm: group for algorithm, group in runs_by_algorithm.items()
             if any(changes(run, LR) for run in group)}
    if tuned:
        panels = figures.trajectory_panels(tuned, LR, LABELS[LR])
        panels.suptitle(f"{title}: learning rate of up to 20 runs per algorithm", fontsize=9)
        report.add(f"{title}: learning-rate trajectories", "The learning rate of 20 randomly chosen runs of each "
                   "algorithm that changes it, at the end of every hyperparameter step, against the weight step.",
                   figures.save(panels, report.out / f"{prefix}_learning_rates"))
    else:
        report.skip(f"{title}: learning-rate trajectories", "no run here changes its learning rate")

    seconds = {algorithm: np.array([run.metrics.get("train_seconds", math.nan) for run in group])
               for algorithm, group in runs_by_algorithm.items()}
    if any(np.isfinite(values).any() for values in seconds.values()):
        figure, axes = figures.new_figure()
        figures.plot_violins(axes, seconds, "training time per run (s)")
        axes.set_title(f"{title}: training time per run ({count_note(runs_by_algorithm)})", fontsize=9)
        report.add(f"{title}: run times", "Distribution of each algorithm's training seconds per run.",
                   figures.save(figure, report.out / f"{prefix}_runtimes"))
    else:
        report.skip(f"{title}: run times", "no run records its training seconds (metrics.json's train_seconds)")


def statistics_section(report: Report, prefix: str, title: str, label: str, finals: dict[str, np.ndarray],
                  validation_runs: int) -> None:
    """The table of final values (Markdown in the report, LaTeX rows beside it), with a note on each
    row that lacks a statistic, saying why."""
    summaries = {algorithm: figures.summarise(values) for algorithm, values in finals.items()}
    header, rows, latex = figures.statistics_table(summaries)
    util.write_text(report.out / f"{prefix}_table.tex", "\n".join(latex) + "\n")
    notes = [figures.three_batched_note(validation_runs)] if "Random_3Batched" in finals else []
    for name, summary in summaries.items():
        total = summary.runs + summary.diverged
        shown = results_table.paper_name(name)
        if name != "Random_3Batched" and summary.runs < 2:       # the 3-batched row's note says why
            notes.append(f"{shown}: only 1 of {total} runs ended with a finite value, so no standard error."
                         if summary.runs else f"{shown}: none of {total} runs ended with a finite value, so its "
                         f"row has no value (-).")
    report.add(f"{title}: results table", f"{label}: mean and median over initialisations (± bootstrap standard "
               f"error, 1000 resamples), best, and diverged runs (left out); bold: the best, or within the "
               f"best's standard error of it. LaTeX rows: {prefix}_table.tex.",
               text="\n\n".join([figures.markdown_table(header, rows), *notes]))


def diverged_as_infinite(values: np.ndarray, runs: list[util.Run]) -> np.ndarray:
    """values[run, x] with a diverged run's missing values (from its divergence on) +inf: worse than
    any, so that the median over all runs stays defined where fewer than half diverged."""
    values = values.copy()
    for row, run in enumerate(runs):
        if run.metrics.get("status") == "diverged":
            values[row, np.isnan(values[row])] = np.inf
    return values


def envelope_curves(runs_by_algorithm: dict[str, list[util.Run]], tag: str,
                    axis: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{algorithm: (x, values[run, x])} of `tag` against weight step or wall time."""
    curves = {}
    for algorithm, group in runs_by_algorithm.items():
        x, values = util.stack(group, tag) if axis == "step" else figures.on_time_grid(group, tag)
        curves[algorithm] = (x, diverged_as_infinite(values, group))
    return curves


def envelope_figures(report: Report, prefix: str, title: str, runs_by_algorithm: dict[str, list[util.Run]],
                     dataset: str) -> None:
    """The loss envelopes against weight step and against wall time (skipped when no run logs the curve)."""
    tag, label = curve_metric(dataset)
    for axis, xlabel in (("step", "weight step"), ("time", "wall time (s)")):
        curves = envelope_curves(runs_by_algorithm, tag, axis)
        if not any(figures.has_values(values) for _, values in curves.values()):
            report.skip(f"{title}: envelope against {axis}", f"no run logs a finite {label} ({tag}) during training")
            continue
        figure, axes = figures.new_figure()
        figures.plot_envelopes(axes, curves, xlabel, label)
        axes.set_title(f"{title}: {label} against {xlabel.split(' (')[0]} ({count_note(runs_by_algorithm)})",
                       fontsize=9)
        report.add(f"{title}: envelope against {axis}", f"Bootstrap median of the {label} over runs (band: the "
                   f"central 68% of 1000 bootstrap medians), against {xlabel}, where every run of the algorithm "
                   f"has a value (a diverged run counts as infinitely bad from its divergence on).",
                   figures.save(figure, report.out / f"{prefix}_envelope_{axis}"))


def count_note(runs_by_algorithm: dict[str, list]) -> str:
    """'5 runs per algorithm', or '3 to 5 runs per algorithm'."""
    counts = sorted({len(group) for group in runs_by_algorithm.values()})
    runs = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return f"{runs} run{'s' if counts[-1] > 1 else ''} per algorithm"


def sensitivity_figure(report: Report, prefix: str, title: str, runs: list[util.Run], dataset: str) -> None:
    tag, label = headline(dataset)
    for algorithm in sorted({run.config["algorithm"] for run in runs}):
        cells: dict[tuple[int, int], list[float]] = {}
        for run in runs:
            if run.config["algorithm"] == algorithm:
                cells.setdefault(setting_of(run), []).append(figures.final_value(run, tag))
        largest = max(max(key) for key in cells)
        grid = np.full((largest, largest), np.nan)
        for (steps, terms), values in cells.items():
            finite = np.array(values)[np.isfinite(values)]
            grid[steps - 1, terms - 1] = np.median(finite) if len(finite) else np.nan
        figure, axes = figures.new_figure(width=5.2, height=3.6)
        figures.plot_heatmap(axes, grid, "i (look-back)", "T (weight steps per hyperparameter step)",
                             f"median {label}")
        axes.set_title(f"{title}: {results_table.paper_name(algorithm)}, median {label}", fontsize=9)
        report.add(f"{title}: sensitivity of {algorithm}", f"Median {label} over initialisations for each T and i.",
                   figures.save(figure, report.out / f"{prefix}_sensitivity_{algorithm}"))


def hypergradient_comparison(report: Report, prefix: str, title: str, runs: list[util.Run]) -> bool:
    """Relative error of Ours' first hypergradient against Diff-through-Opt's from the same point
    and (T, i), median over points, for each hyperparameter; False when there is nothing to pair."""
    first: dict[tuple, dict[str, float]] = {}
    for run in runs:
        family = "exact" if run.config["algorithm"] == "DiffThroughOpt" else "implicit"
        key = (family, setting_of(run), run.config["seed"])
        first[key] = {tag.removeprefix("Last_Hypergradient/"): scalar.values[0]
                      for tag, scalar in run.scalars.items() if tag.startswith("Last_Hypergradient/")}
    made = False
    for name in ("Lr", "Weight_Decay"):
        errors: dict[tuple[int, int], list[float]] = {}
        for (family, setting, seed), values in first.items():
            exact = first.get(("exact", setting, seed), {}).get(name)
            if family == "implicit" and name in values and exact:
                errors.setdefault(setting, []).append(abs(values[name] - exact) / abs(exact))
        if not errors:
            continue
        largest = max(max(setting) for setting in errors)
        grid = np.full((largest, largest), np.nan)
        for (steps, terms), values in errors.items():
            grid[steps - 1, terms - 1] = max(np.median(values), ERROR_FLOOR)
        figure, axes = figures.new_figure(width=5.2, height=3.6)
        figures.plot_heatmap(axes, grid, "i (Neumann terms; unrolled steps R = i)", "T (weight steps)",
                             "median relative error")
        axes.set_title(f"{title}: error of the first {name.lower().replace('_', ' ')} hypergradient", fontsize=9)
        report.add(f"{title}: hypergradient error ({name})", f"Relative error of the implicit (Ours) first "
                   f"hypergradient of {name.lower()} against Diff-through-Opt's from the same initialisation, T "
                   f"and i (R = i), median over {sum(map(len, errors.values()))} pairs. At i = R = 1 both "
                   f"differentiate exactly through the one step: errors below {ERROR_FLOOR:g} are drawn at it.",
                   figures.save(figure, report.out / f"{prefix}_hypergradient_error_{name}"))
        made = True
    return made


def proof_of_concept(report: Report, prefix: str, title: str, runs: list[util.Run], dataset: str) -> None:
    """Ours_LR's (lr, weight decay) trajectories over a Gaussian-process interpolation of the final
    test loss of fixed-hyperparameter Random runs started across the same space."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, WhiteKernel

    from onepass import bayesopt
    tag, label = headline(dataset)
    random = [run for run in runs if run.config["algorithm"] == "Random"]
    ours = [run for run in runs if run.config["algorithm"] == "Ours_LR"]
    if len(random) < 10 or not ours:
        report.skip(f"{title}: proof-of-concept plot", f"needs at least 10 Random runs and some "
                    f"{results_table.paper_name('Ours_LR')} runs "
                    f"(has {len(random)} and {len(ours)})")
        return
    inputs = np.array([[math.log10(run.config["optimiser"]["lr"]), math.log10(run.config["optimiser"]["weight_decay"])]
                       for run in random])
    finals = np.array([figures.final_value(run, tag) for run in random])
    cap = bayesopt.CAPS.get(dataset, np.nanmax(finals[np.isfinite(finals)], initial=1.0))
    targets = np.log10(np.clip(np.where(np.isfinite(finals), finals, cap), 1e-12, cap))
    process = GaussianProcessRegressor(RBF([1.0, 1.0]) + WhiteKernel(), normalize_y=True, random_state=0)
    process.fit(inputs, targets)
    low, high = inputs.min(axis=0), inputs.max(axis=0)
    grid = np.stack(np.meshgrid(np.linspace(low[0], high[0], 100), np.linspace(low[1], high[1], 100)), axis=-1)
    surface = process.predict(grid.reshape(-1, 2)).reshape(100, 100)
    figure, axes = figures.new_figure(width=5.0, height=4.0)
    contours = axes.contourf(grid[..., 0], grid[..., 1], surface, levels=20, cmap="viridis")
    figure.colorbar(contours, ax=axes, label=f"log10 {label}\n(Random's runs, GP fit)")
    for run in ours[:20]:
        lr, decay = run.scalars.get("Last_Hyperparameter/Lr"), run.scalars.get("Last_Hyperparameter/Weight_Decay")
        if lr is not None and decay is not None:
            axes.plot(np.log10(lr.values), np.log10(decay.values), color="white", linewidth=0.8)
            axes.plot(np.log10(lr.values[:1]), np.log10(decay.values[:1]), "o", color="white", markersize=3)
    axes.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), xlabel="log10 learning rate",
             ylabel="log10 weight decay")
    axes.grid(False)
    ours_name = results_table.paper_name("Ours_LR")
    axes.set_title(f"{title}:\n{ours_name} over Random's {label}", fontsize=9)
    report.add(f"{title}: proof of concept", f"Background: a Gaussian-process fit (RBF + white noise) of the log10 "
               f"{label} of {len(random)} Random runs over their fixed (lr, weight decay); diverged runs count as "
               f"{cap:g}. Lines: {min(len(ours), 20)} {ours_name} runs' hyperparameters during training, from the "
               f"dots.",
               figures.save(figure, report.out / f"{prefix}_proof_of_concept"))


def repetition_of(run: util.Run) -> tuple[str, int] | None:
    """(repetition folder, evaluation number) of a Bayesian-optimisation run, else None."""
    parent = run.path.parent.name
    return (str(run.path.parent), int(run.path.name)) if parent.startswith("repetition_") else None


def bayesopt_figure(report: Report, dataset: str, sequences: list[util.Run], others: list[util.Run]) -> None:
    """Best-so-far test value of Bayesian optimisation against its cumulative training time (the
    test value of the run with the best validation objective so far; median over repetitions),
    beside the other algorithms' test curves against elapsed time."""
    from onepass import bayesopt
    tag, label = headline(dataset)
    by_repetition: dict[str, list[util.Run]] = {}
    for run in sorted(sequences, key=repetition_of):
        by_repetition.setdefault(repetition_of(run)[0], []).append(run)
    curves = []
    for runs in by_repetition.values():
        times = np.cumsum([run.metrics.get("train_seconds", 0.0) for run in runs])
        objectives = np.array([bayesopt.objective(run.metrics) for run in runs])
        objectives[~np.isfinite(objectives)] = np.inf
        best = np.minimum.accumulate(objectives)
        chosen = [int(np.flatnonzero(objectives == value)[0]) for value in best]
        curves.append((times, np.array([figures.final_value(runs[index], tag) for index in chosen])))
    end = max(times[-1] for times, _ in curves)
    grid = np.linspace(0.0, end, 1000)
    values = np.array([np.where(grid >= times[0], values[np.clip(np.searchsorted(times, grid, side="right") - 1,
                                                                  0, None)], np.nan) for times, values in curves])
    figure, axes = figures.new_figure()
    others_by_algorithm: dict[str, list[util.Run]] = {}
    for run in sorted(others, key=lambda run: results_table.order_key(run.config["algorithm"])):
        others_by_algorithm.setdefault(run.config["algorithm"], []).append(run)
    envelopes = envelope_curves(others_by_algorithm, tag, "time")
    envelopes[figures.BAYESOPT] = (grid, values)
    figures.plot_envelopes(axes, envelopes, "wall time (s)", LABELS[tag])
    axes.set_xscale("symlog", linthresh=0.1)
    axes.set_xlim(left=0.0)                  # no negative time
    axes.set_title(f"{results_table.dataset_name(dataset)}: {label}, Bayesian optimisation's best so far "
                   f"({len(curves)} repetitions)", fontsize=9)
    report.add(f"Bayesian optimisation, {dataset}: best so far against time",
               f"Bayesian optimisation ({len(curves)} repetitions): the {label} of the run with the best validation "
               f"objective so far, against the cumulative training time of its sequence; the other algorithms: their "
               f"{LABELS[tag]} during one run against its elapsed time. Medians, with the central 68% of bootstrap "
               f"medians.",
               figures.save(figure, report.out / f"bayesopt_{dataset}_best_so_far"))


def meta_scaling_figure(report: Report, runs: dict[str, util.Run]) -> None:
    """The meta-learning scaling figure and table (meta_scaling.py's), from the meta_dataset runs."""
    from onepass import meta_scaling
    results: dict[int, list[tuple[int, float, Path]]] = {}
    for run in runs.values():
        accuracy = run.metrics.get("final", {}).get("Meta/Adapted_Accuracy")
        if run.config.get("task") == "meta_dataset" and accuracy is not None:
            results.setdefault(run.metrics["world_size"], []).append((run.config["seed"], accuracy, run.path))
    if not results:
        report.skip("meta-dataset scaling figure", "no finished meta_dataset runs (meta_scaling.py makes them)")
        return
    paths = meta_scaling.figure(results, report.out / "meta_scaling")
    report.add("Meta-learning: scaling with processes", "The learned dataset of the median seed per number of "
               "processes (with sample adapted decision boundaries), and the accuracy of 1000 fresh classifiers "
               "after adaptation against the number of processes (tasks per outer step).", paths,
               text=meta_scaling.table(results))


def names_of(experiment: str, dataset: str) -> tuple[str, str]:
    """(file name prefix, title) of an experiment's figures on a dataset: the dataset alone when the
    experiment is named after it (or the folder is a flat list of runs)."""
    alone = experiment in (dataset, "runs")
    name = results_table.dataset_name(dataset)
    return (dataset, name) if alone else (f"{experiment}_{dataset}", f"{name} ({experiment})")


def main(argv: list[str] | None = None) -> int:
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results folder (e.g. runs/paper)")
    parser.add_argument("--out", type=Path, help="where the figures and report go (default: RESULTS/paper)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"paper_plots.py: error: {args.results}: no such folder", file=sys.stderr)
        return 2
    out = args.out or args.results / "paper"
    try:
        util.check_output_folder(out, f"--out {out}" if args.out else f"the output folder {out}",
                                 "choose another with --out DIR")
    except ConfigError as error:
        print(f"paper_plots.py: error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    runs = readable_runs(util.get_tags(args.results), report)
    groups = group_runs(runs)
    if not groups:
        report.skip("everything", f"no finished hyperparameter-optimisation runs below {args.results}")
    sequences = {key: [run for run in group if repetition_of(run)] for key, group in groups.items()}
    for (experiment, dataset), found in sequences.items():
        if found:
            others = [run for (_, other), group in groups.items() if other == dataset for run in group
                      if not repetition_of(run) and not setting_of(run)]
            bayesopt_figure(report, dataset, found, others)
            groups[(experiment, dataset)] = [run for run in groups[(experiment, dataset)] if not repetition_of(run)]
    if not any(sequences.values()):
        report.skip("best-so-far against wall time with Bayesian optimisation", "no Bayesian-optimisation runs "
                    "(<dataset>/repetition_<r>/<k> folders, as bayesopt.py writes them)")
    for (experiment, dataset), group in sorted(groups.items()):
        if not group:
            continue
        prefix, title = names_of(experiment, dataset)
        in_grid = [run for run in group if setting_of(run) is not None]
        compared = in_grid and hypergradient_comparison(report, prefix, title, in_grid)
        long_enough = [run for run in in_grid if run.config["hyperparameter_steps"] > 2]
        if long_enough:
            sensitivity_figure(report, prefix, title, long_enough, dataset)
        elif in_grid and not compared:
            report.skip(f"{title}: (T, i) grid", "too short for the sensitivity study and no hypergradient pairs")
        main_style = [run for run in group if setting_of(run) is None]
        if main_style:
            main_figures(report, prefix, title, main_style, dataset)
            proof_of_concept(report, prefix, title, main_style, dataset)
    duels = head_to_head.render(args.results, None, depth=2)      # (unreadable runs are listed above)
    if duels:
        report.add("Head to head on shared draws", head_to_head.EXPLAINED, text=duels)
    else:
        report.skip("head to head", "no two algorithms of an experiment and dataset ran from the same draws")
    meta_scaling_figure(report, runs)
    path = report.write(args.results)
    for line in report.skipped:
        print(f"skipped {line[2:]}")
    print(f"wrote {len(report.sections)} sections to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(util.run_command(main))
