"""util.get_tags: every scalar and histogram of every run, aligned by step, cached per run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from onepass import results_table, run_files, train, util
from tests.conftest import REPO


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> util.Run:
    root = tmp_path_factory.mktemp("runs")
    assert train.main(["-c", str(REPO / "configs/diabetes.yaml"), str(REPO / "configs/Ours_HDLR_Momentum.yaml"),
                       "--seed", "0", "--hyperparameter_steps", "6", "--set", "model.layer_sizes=[10, 8, 1]",
                       "-l", str(root)]) == 0
    return root


def test_get_tags_reads_what_tensorboard_reads(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator
    (run,) = util.get_tags(logged_run, use_cache=False).values()
    accumulator = EventAccumulator(str(run.path), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    accumulator.Reload()
    assert sorted(run.scalars) == sorted(accumulator.Tags()[SCALARS])
    for tag, scalar in run.scalars.items():
        events = accumulator.Scalars(tag)
        np.testing.assert_array_equal(scalar.steps, [e.step for e in events])
        np.testing.assert_array_equal(scalar.values, np.array([e.value for e in events], dtype=np.float32))
        np.testing.assert_array_equal(scalar.wall_times, [e.wall_time for e in events])
    histogram = run.histograms["Hyperparameter/Lr"]
    events = accumulator.Histograms("Hyperparameter/Lr")
    np.testing.assert_array_equal(histogram.steps, np.arange(6))
    for counts, event in zip(histogram.counts, events, strict=True):
        np.testing.assert_array_equal(counts, event.histogram_value.bucket)
        assert counts.sum() == 10 * 8 + 8 + 8 + 1          # one lr per weight element


def test_the_cache_is_used_until_the_event_files_change(logged_run):
    (first,) = util.get_tags(logged_run).values()
    cache = first.path / util.CACHE_NAME
    assert cache.is_file()
    cache_time = cache.stat().st_mtime_ns
    (again,) = util.get_tags(logged_run, "Loss/Test").values()
    assert cache.stat().st_mtime_ns == cache_time and list(again.scalars) == ["Loss/Test"]
    np.testing.assert_array_equal(again.scalars["Loss/Test"].values, first.scalars["Loss/Test"].values)

    log = run_files.RunLog(first.path)            # e.g. a resumed run adds a file
    log.scalars(10_000, {"Loss/Test": 0.5})
    log.close()
    (changed,) = util.get_tags(logged_run, "Loss/Test").values()
    assert changed.scalars["Loss/Test"].steps[-1] == 10_000 and changed.scalars["Loss/Test"].values[-1] == 0.5
    assert cache.stat().st_mtime_ns != cache_time


def test_a_record_cut_short_by_a_kill_ends_the_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    log = run_files.RunLog(run_dir)
    for step in range(5):
        log.scalars(step, {"Loss/Training": float(step)})
    log.close()
    (events,) = run_dir.glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])
    (run,) = util.get_tags(tmp_path).values()
    np.testing.assert_array_equal(run.scalars["Loss/Training"].steps, [0, 1, 2, 3])


def test_stack_aligns_runs_by_step_not_position():
    def run(steps, values):
        return util.Run(path=None, config={}, metrics={}, scalars={
            "Loss/Test": util.Scalar(np.array(steps), np.array(values, dtype=float), np.zeros(len(steps)))})
    steps, values = util.stack([run([0, 10, 20], [3, 2, 1]), run([0, 20], [5, 4]), util.Run(None, {}, {})],
                               "Loss/Test")
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [[3, 2, 1], [5, np.nan, 4], [np.nan] * 3])


def test_histogram_values_round_trip_through_the_cache(logged_run):
    (fresh,) = util.get_tags(logged_run, use_cache=False).values()
    util.get_tags(logged_run)
    (cached,) = util.get_tags(logged_run).values()
    for tag, histogram in fresh.histograms.items():
        np.testing.assert_array_equal(cached.histograms[tag].steps, histogram.steps)
        for a, b in zip(cached.histograms[tag].limits, histogram.limits, strict=True):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_bootstrap_standard_error_matches_the_direct_computation():
    from onepass import figures
    values = np.random.default_rng(1).normal(3.0, 2.0, 400)
    direct = values.std() / np.sqrt(len(values))                     # the standard error of the mean
    got = figures.bootstrap_standard_error(values, np.mean, samples=20_000)
    assert abs(got - direct) / direct < 0.03
    # The median's, against its exact bootstrap distribution (odd n = 2m + 1: the resampled median
    # is at most the k-th smallest value when at least m + 1 draws are).
    from scipy.stats import binom
    values = values[:401]
    ordered, n = np.sort(values), len(values)
    at_most = binom.sf((n - 1) // 2, n, np.arange(n + 1) / n)
    probabilities = np.diff(at_most)
    exact = np.sqrt(probabilities @ ordered**2 - (probabilities @ ordered) ** 2)
    got = figures.bootstrap_standard_error(values, np.median, samples=20_000)
    assert abs(got - exact) / exact < 0.03


@pytest.mark.filterwarnings("ignore:All-NaN slice")           # numpy's, on the slices with no value
def test_nanmedian_is_numpys():
    from onepass import figures
    values = np.random.default_rng(2).normal(size=(50, 7, 40))
    values[np.random.default_rng(3).random(values.shape) < 0.4] = np.nan
    values[:, :, 0], values[:, 0, 1], values[:, 1, 1] = np.nan, np.inf, -np.inf
    np.testing.assert_array_equal(figures.nanmedian(values, axis=1), np.nanmedian(values, axis=1))


def test_summary_excludes_and_counts_diverged_runs():
    from onepass import figures
    summary = figures.summarise(np.array([1.0, 2.0, 3.0, np.nan, np.inf, 500.0]), threshold=100.0)
    assert (summary.runs, summary.diverged, summary.mean, summary.median, summary.best) == (3, 3, 2.0, 2.0, 1.0)
    assert summary.mean_se > 0 and summary.median_se > 0


def test_three_batching_keeps_the_best_validation_run_of_each_triple():
    from onepass import figures
    test = np.arange(9, dtype=float) * 10
    validation = np.array([5, 4, 3, 2, 1, 0, 9, np.nan, 7], dtype=float)
    chosen = figures.three_batched(test, validation, seed=0)
    order = np.random.default_rng(0).permutation(9).reshape(3, 3)
    expected = [test[triple[np.argmin(np.where(np.isnan(validation[triple]), np.inf, validation[triple]))]]
                for triple in order]
    np.testing.assert_array_equal(chosen, expected)
    assert len(figures.three_batched(test[:8], validation[:8])) == 2       # leftovers are dropped


def write_run(run_dir, algorithm: str, final_test: float, lr_path: list[float], seconds: float,
              seed: int = 0, windows: int = 5, extra: dict | None = None) -> None:
    """A synthetic run directory with known values, written as the framework writes one."""
    run_dir.mkdir(parents=True)
    config = {"task": "hyperparameter_optimisation", "algorithm": algorithm, "dataset": {"name": "uci_energy"},
              "seed": seed, "hyperparameter_steps": windows,
              "optimiser": {"lr": lr_path[0], "weight_decay": 10 ** -(seed % 5 + 2)}}
    (run_dir / "config.json").write_text(json.dumps(config))
    final = {"Unnormalised_Loss/Test": final_test, "Loss/Validation": final_test / 10}
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed", "final": final,
                                                      "train_seconds": seconds}))
    log = run_files.RunLog(run_dir)
    for step in range(0, 101, 10):
        log.scalars(step, {"Unnormalised_Loss/Test": final_test * (1 + (100 - step) / 10)})
    for window, lr in enumerate(lr_path):
        log.scalars(window, {"Last_Hyperparameter/Lr": lr, "Last_Hyperparameter/Weight_Decay": 1e-3 * (window + 1),
                             **(extra or {})})
    log.close()


def write_main_experiment(root, finals: dict[str, list[float]], experiment: str = "main") -> None:
    """A main experiment's runs with these final test values (Random ones at a fixed learning rate)."""
    for algorithm, values in finals.items():
        for index, value in enumerate(values):
            lrs = [1e-3] * 5 if algorithm.startswith("Random") else [1e-3 * 1.5**k for k in range(5)]
            write_run(root / experiment / "uci_energy" / algorithm / f"run{index}", algorithm, value, lrs,
                      seconds=1.0 + index)


def write_studies(root) -> None:
    """Runs of the sensitivity study, the hypergradient comparison, the proof of concept and
    Bayesian optimisation."""
    for steps, terms in [(1, 1), (2, 1), (2, 2)]:
        for seed in range(3):
            group = f"Update{steps}_Rollback{terms}"
            # Sensitivity runs (5 windows) and comparison runs (2 windows, Ours 10% off DTO's hypergradient).
            write_run(root / "sensitivity" / "uci_energy" / "Ours_LR_Momentum" / group / f"r{seed}",
                      "Ours_LR_Momentum", steps + terms + seed, [1e-3] * 5, 1.0, seed)
            for algorithm, scale in (("Ours_LR_Momentum", 1.1), ("DiffThroughOpt", 1.0)):
                write_run(root / "comparison" / "uci_energy" / algorithm / group / f"r{seed}", algorithm, 1.0,
                          [1e-3, 2e-3], 1.0, seed, windows=2, extra={"Last_Hypergradient/Lr": 0.5 * scale})
    for seed in range(12):
        write_run(root / "concept" / "uci_energy" / "Random" / f"r{seed}", "Random", 1.0 + seed, [10 ** -(seed % 6)],
                  1.0, seed)
    write_run(root / "concept" / "uci_energy" / "Ours_LR" / "r0", "Ours_LR", 0.5, [1e-3, 3e-3, 1e-2], 1.0)
    for k in range(4):
        write_run(root / "bayesopt" / "uci_energy" / "repetition_0" / f"{k:02d}", "Random_Validation", 4.0 - k,
                  [1e-3], 2.0, seed=k)


def run_paper_plots(root, out) -> dict:
    """paper_plots.main on `root` into `out`: {name: figure} of every figure saved."""
    from onepass import figures, paper_plots
    saved, save = {}, figures.save

    def keeping_save(figure, path):
        saved[path.name] = figure
        return save(figure, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "save", keeping_save)
        assert paper_plots.main([str(root), "--out", str(out)]) == 0
    return saved


def assert_real_pictures(out) -> None:
    """Every PNG written, opened: a picture of sensible size and shape with something drawn in it,
    and every one the report shows among them."""
    from matplotlib.image import imread
    written = sorted(out.glob("*.png"))
    assert written
    for path in written:
        image = imread(path)
        height, width = image.shape[:2]
        assert 200 <= min(height, width) and width <= 4 * height and height <= 4 * width, (path.name, image.shape)
        colours = np.round(image * 255).astype(np.uint32) @ (1 << np.arange(0, 8 * image.shape[-1], 8, dtype=np.uint32))
        assert len(np.unique(colours)) > 50, path.name            # not a blank page
    shown = re.findall(r"\]\(([^)]+\.png)\)", (out / "report.md").read_text())
    assert shown and set(shown) <= {path.name for path in written}


def pixels(figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(figure)              # a closed figure has lost its own
    canvas.draw()
    return np.array(canvas.buffer_rgba(), dtype=int)[..., :3]


def axis_labels(figure) -> list[str]:
    labels = [figure.get_supxlabel(), figure.get_supylabel()]
    labels += [label for axes in figure.axes if axes.get_visible() for label in (axes.get_xlabel(), axes.get_ylabel())]
    return [label for label in labels if label]


def covered(figure) -> list[str]:
    """Legends that lie over their axes' data, and axis labels that lie under other axes (such as
    a colour bar)."""
    pixels(figure)                                  # lays the figure out
    shown, found = [axes for axes in figure.axes if axes.get_visible()], []
    for axes in shown:
        legend = axes.get_legend()
        if legend and legend.get_window_extent().overlaps(axes.get_window_extent()):
            found.append("legend")
        for label in (axes.xaxis.label, axes.yaxis.label):
            if label.get_text() and any(label.get_window_extent().overlaps(other.get_window_extent())
                                        for other in shown if other is not axes):
                found.append(label.get_text())
    return found


def own_pixels(figure, algorithm: str) -> int:
    """How many pixels the curve of `algorithm` (labelled by its paper name) visibly changes: none
    when it lies hidden under another (the legend, which would show it anyway, left out)."""
    label = results_table.paper_name(algorithm)
    legend, (line,) = figure.axes[0].get_legend(), [line for line in figure.axes[0].get_lines()
                                                   if line.get_label() == label]
    legend.set_visible(False)
    whole = pixels(figure)
    line.set_visible(False)
    changed = int((np.abs(pixels(figure) - whole).max(axis=-1) > 64).sum())
    line.set_visible(True)
    legend.set_visible(True)
    return changed


MAIN_FINALS = {"Random": [4.0, 2.0, 9.0, 1.0], "Random_Validation": [3.0, 5.0, 7.0, 6.0, 8.0, 2.0],
               "Ours_LR_Momentum": [0.5, 0.25, 1.0, 0.75]}


def markdown_rows(report: str) -> dict[str, list[str]]:
    """The cells after the first of every Markdown table row in `report`, by that first cell."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in report.splitlines()
            if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows}


def test_paper_plots_writes_the_table_and_figures_of_a_main_experiment(tmp_path, capsys):
    from onepass import paper_plots
    write_main_experiment(tmp_path / "results", MAIN_FINALS)
    assert paper_plots.main([str(tmp_path / "results"), "--out", str(tmp_path / "paper")]) == 0
    out = tmp_path / "paper"
    for name in ("cdf", "envelope_step", "envelope_time", "learning_rates", "runtimes"):
        for suffix in (".png", ".pdf"):
            assert (out / f"main_uci_energy_{name}{suffix}").stat().st_size > 5000, name
    report = (out / "report.md").read_text()
    rows = markdown_rows(report)
    assert rows["algorithm"] == ["runs", "mean ± s.e.", "median ± s.e.", "best", "diverged"]
    ours = rows[results_table.paper_name("Ours_LR_Momentum")]
    assert ours[0] == "4" and ours[1].startswith("**0.625 ± ")    # the mean of 0.5, 0.25, 1.0, 0.75, best
    random = rows["Random"]
    assert random[0] == "4" and random[1].startswith("4 ± ") and random[3:] == ["1", "0"]  # best 1, none diverged
    three = rows[results_table.paper_name("Random_3Batched")]           # 6 Random_Validation runs: 2 triples
    assert three[0] == "2" and three[-1] == "0"
    assert "![UCI Energy (main): CDF](main_uci_energy_cdf.png)" in report
    assert "sensitivity" not in report.lower().split("## not made")[0]
    assert "proof-of-concept plot: needs at least 10 Random runs and some Ours (WD+LR) runs (has 4 and 0)" in \
        capsys.readouterr().out


def test_paper_plots_says_what_it_could_not_make(tmp_path, capsys):
    from onepass import paper_plots
    (tmp_path / "empty").mkdir()
    assert paper_plots.main([str(tmp_path / "empty")]) == 0
    report = (tmp_path / "empty" / "paper" / "report.md").read_text()
    assert "## Not made" in report and "no finished hyperparameter-optimisation runs" in report
    assert paper_plots.main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# Six algorithms that tune the learning rate (a strip of 6 panels is too wide to read), and
# Lorraine's and Baydin_Exact's runs the same as Random's, so that their curves coincide (as they
# nearly do on UCI Energy).
EVERY_FINALS = MAIN_FINALS | {"Lorraine": MAIN_FINALS["Random"], "Baydin_Exact": MAIN_FINALS["Random"],
                              "Baydin": [0.4, 0.6, 0.8], "Ours_HDLR_Momentum": [0.3, 0.5], "DiffThroughOpt": [0.2, 0.9]}
COINCIDING = ("Random", "Lorraine", "Baydin_Exact")


@pytest.fixture(scope="module")
def every_figure(tmp_path_factory) -> tuple:
    """The output folder and figures of paper_plots on a main experiment and every study."""
    root = tmp_path_factory.mktemp("every_figure")
    write_main_experiment(root / "results", EVERY_FINALS)
    write_studies(root / "results")
    return root / "paper", run_paper_plots(root / "results", root / "paper")


def test_paper_plots_makes_the_study_figures_from_their_runs(every_figure):
    """Sensitivity grid, hypergradient comparison, proof of concept and Bayesian optimisation."""
    out, _ = every_figure
    report = (out / "report.md").read_text()
    for name in ("sensitivity_uci_energy_sensitivity_Ours_LR_Momentum", "comparison_uci_energy_hypergradient_error_Lr",
                 "concept_uci_energy_proof_of_concept", "bayesopt_uci_energy_best_so_far"):
        assert (out / f"{name}.png").stat().st_size > 5000 and (out / f"{name}.pdf").is_file(), name
    assert "median over 9 pairs" in report                # 3 settings x 3 seeds of Ours against DTO
    assert "Bayesian optimisation (1 repetitions)" in report
    assert "- meta-dataset scaling figure: no finished meta_dataset runs" in report


def test_every_figure_file_is_a_real_picture(every_figure):
    out, saved = every_figure
    assert len(saved) == 14 and {path.stem for path in out.glob("*.png")} == set(saved)
    assert_real_pictures(out)


def test_figures_label_their_axes_in_words_and_cover_neither_data_nor_labels(every_figure):
    _, saved = every_figure
    for name, figure in saved.items():
        labels = axis_labels(figure)
        assert labels and not [label for label in labels if "/" in label or "_" in label], (name, labels)
        assert covered(figure) == [], name
    assert axis_labels(saved["main_uci_energy_envelope_step"]) == ["weight step", "test MSE (target units)"]
    assert axis_labels(saved["main_uci_energy_cdf"]) == ["final test MSE (target units)",
                                                         "fraction of runs at or below"]
    assert axis_labels(saved["main_uci_energy_learning_rates"])[:2] == ["weight step", "learning rate"]
    assert saved["main_uci_energy_envelope_time"].axes[0].get_legend() is not None
    for name in ("cdf", "envelope_step", "envelope_time", "runtimes"):    # dataset, quantity and runs (2 to 6)
        title = saved[f"main_uci_energy_{name}"].axes[0].get_title()
        assert title.startswith("UCI Energy (main): ") and title.endswith(" (2 to 6 runs per algorithm)"), title


def test_curves_that_coincide_each_stay_visible(every_figure):
    _, saved = every_figure
    for name in ("main_uci_energy_cdf", "main_uci_energy_envelope_step", "main_uci_energy_envelope_time"):
        for label in COINCIDING:
            assert own_pixels(saved[name], label) >= 20, (name, label)


def test_degenerate_figures_are_skipped_with_the_reason(tmp_path):
    """One run per algorithm: no CDF (a point each), and the 3-batched Random has no triple; runs
    that log no curve: no envelopes."""
    root = tmp_path / "results"
    write_main_experiment(root, {"Random": [2.0], "Random_Validation": [3.0], "Ours_LR_Momentum": [0.5]})
    write_main_experiment(root, {"Ours_LR": [1.0, 2.0]}, experiment="quiet")
    for events in (root / "quiet").rglob("events.out.tfevents.*"):
        events.unlink()
    saved = run_paper_plots(root, tmp_path / "paper")
    report = (tmp_path / "paper" / "report.md").read_text()
    not_made = report.split("## Not made")[1]
    assert "main_uci_energy_cdf" not in saved and not (tmp_path / "paper" / "main_uci_energy_cdf.png").exists()
    assert "UCI Energy (main): CDF: no algorithm has 2 runs with a finite final value" in not_made
    validation, three = (results_table.paper_name(name) for name in ("Random_Validation", "Random_3Batched"))
    assert f"{validation} runs; 1 runs make no triple, so its row has no value (-)." in report
    assert f"| {three} | 0 | - | - | - | 0 |" in report
    assert "Random: only 1 of 1 runs ended with a finite value, so no standard error." in report
    assert "main_uci_energy_envelope_step" in saved                  # the one-run curves are still curves
    assert "UCI Energy (quiet): envelope against step: no run logs a finite test MSE (target units)" in not_made
    assert "UCI Energy (quiet): envelope against time: no run logs a finite test MSE" in not_made
    assert "quiet_uci_energy_cdf" in saved                            # two finite runs: a CDF
    assert_real_pictures(tmp_path / "paper")


def test_an_experiment_named_after_its_dataset_names_the_dataset_once(tmp_path):
    from onepass import paper_plots
    write_main_experiment(tmp_path / "results", {"Random": [2.0, 1.0], "Ours_LR_Momentum": [0.5, 0.25]},
                          experiment="uci_energy")
    assert paper_plots.main([str(tmp_path / "results"), "--out", str(tmp_path / "paper")]) == 0
    out = tmp_path / "paper"
    for name in ("cdf.png", "envelope_step.png", "table.tex"):
        assert (out / f"uci_energy_{name}").is_file(), name
    assert not list(out.glob("uci_energy_uci_energy*"))
    report = (out / "report.md").read_text()
    assert "### UCI Energy: results table" in report and "![UCI Energy: CDF](uci_energy_cdf.png)" in report


def scalar(steps, values, seconds=None) -> util.Scalar:
    """A tag's record, logged `seconds` after the run began (by default a step a second)."""
    steps = np.asarray(steps)
    return util.Scalar(steps, np.asarray(values, dtype=float),
                       np.asarray(steps if seconds is None else seconds, dtype=float) + 1e9)


def test_an_envelope_ends_where_the_first_of_its_runs_ends():
    """A median over runs that drops the shorter run once it ends would jump: the line stops there."""
    from onepass import figures
    tag = "Unnormalised_Loss/Test"
    runs = [util.Run(Path(name), {"algorithm": "Random"}, {"status": "completed"},
                     {tag: scalar(range(end + 1), np.linspace(5.0, 1.0, end + 1), seconds=range(end + 1))})
            for name, end in (("long", 10), ("short", 4))]
    x, values = figures.on_time_grid(runs, tag, points=101)
    figure, axes = figures.new_figure()
    figures.plot_envelopes(axes, {"Random": (x, values)}, "wall time (s)", "test MSE")
    (line,) = axes.get_lines()
    drawn = np.asarray(line.get_xdata())[np.isfinite(line.get_ydata())]
    figures.plt.close(figure)
    assert drawn[0] == 0.0 and 4.0 - 0.1 < drawn[-1] <= 4.0          # up to the short run's last second


def test_learning_rates_of_runs_with_other_window_lengths_share_the_weight_step_axis():
    """Ours' 5 windows of T = 10 weight steps and Baydin's 50 one-step windows span the same 50 steps."""
    from onepass import figures
    tag = "Last_Hyperparameter/Lr"
    runs = [util.Run(Path(name), {"algorithm": name, "network_weight_steps": steps}, {"status": "completed"},
                     {tag: scalar(range(windows), np.geomspace(1e-3, 1e-2, windows))})
            for name, steps, windows in (("Ours_LR", 10, 5), ("Baydin", 1, 50))]
    figure, axes = figures.new_figure()
    figures.plot_trajectories(axes, runs, tag)
    spans = sorted((line.get_xdata()[0], line.get_xdata()[-1], len(line.get_xdata())) for line in axes.get_lines())
    figures.plt.close(figure)
    assert spans == [(1, 50, 50), (10, 50, 5)]                         # each window at the weight step that ends it
