"""Mutation check: the hypergradient bugs that matter, each injected into a scratch copy of the
repository, must make the tests fail.

    python tests/mutations.py                 # every mutation (a few minutes)
    python tests/mutations.py neumann_fewer   # the named ones
    python tests/mutations.py --list

A mutation is a textual edit of one source file (each `original` must occur exactly once, so a
mutation that no longer applies is reported rather than silently skipped) plus the tests expected
to catch it. The copy is made once from the files git tracks (and untracked, unignored ones), with
`shared` linked beside it as the tests expect; the repository itself is never modified. First the
union of the tests runs on the unmutated copy (they must pass, or a failure would prove nothing),
then each mutation runs its tests with `-x`. Exit 0 when every mutation was caught, 1 when one
survived or the baseline failed, 2 for an unknown name or a mutation that no longer applies.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

GROUND_TRUTH = ("tests/test_loop_ground_truth.py", "tests/test_hypergradients.py")
DDP_IMPLICIT = "tests/test_distributed.py::test_n_ranks_end_where_one_rank_ends[Ours_LR_Momentum-2]"
DDP_UNROLLED = "tests/test_distributed.py::test_n_ranks_end_where_one_rank_ends[DiffThroughOpt-2]"
ANALYSIS = "tests/test_analysis_truth.py"
MEASUREMENT = "tests/test_measurement_truth.py"
DDP_MEASURED = f"{MEASUREMENT}::test_n_ranks_measure_and_clip_like_one_rank_with_uneven_shards"


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    path: str
    edits: tuple[tuple[str, str], ...]          # (original, mutated) pairs
    tests: tuple[str, ...] = GROUND_TRUTH


MUTATIONS = (
    Mutation("neumann_fewer", "one Neumann term fewer (i - 1 terms)", "algorithms/steps.py",
             (("range(terms - 1)", "range(terms - 2)"),)),
    Mutation("neumann_more", "one Neumann term more (i + 1 terms)", "algorithms/steps.py",
             (("range(terms - 1)", "range(terms)"),)),
    Mutation("implicit_sign", "implicit hypergradient with its sign flipped", "algorithms/steps.py",
             (("return gradient_or_zeros(step.weights, leaves, grad_outputs=total)",
               "return gradient_or_zeros(step.weights, leaves, grad_outputs=[-t for t in total])"),)),
    Mutation("unrolled_sign", "unrolled hypergradient with its sign flipped", "algorithms/steps.py",
             (("return problem.sum_(gradient_or_zeros(loss, leaves))",
               "return problem.sum_(gradient_or_zeros(-loss, leaves))"),)),
    Mutation("log10_chain_rule", "no chain-rule factor ln(10) lr from log10 lr (derivative of the natural value)",
             "algorithms/hyperparameters.py",
             (("lambda raw: torch.pow(10.0, raw))", "lambda raw: raw + (torch.pow(10.0, raw) - raw).detach())"),)),
    Mutation("baydin_chain_rule", "the paper's Baydin with the exact chain-rule factor ln(10) lr",
             "algorithms/baydin.py",
             (("[(-product).reshape(", "[(-product * 2.302585092994046 * 10 ** leaf.detach()).reshape("),),
             ("tests/test_hypergradients.py",)),
    Mutation("baydin_momentum_buffer", "the paper's Baydin from the momentum buffer, not the plain gradient",
             "algorithms/baydin.py",
             (("zip(new_gradient, last.gradient, strict=True)",
               "zip(new_gradient, last.rule_state['momentum_buffer'], strict=True)"),),
             ("tests/test_hypergradients.py",)),
    Mutation("buffer_attached", "the rule's state (momentum buffers) not detached after the tracked steps",
             "train.py", (("self.rule_state = detached(last.rule_state)", "self.rule_state = last.rule_state"),)),
    Mutation("tracked_step_early", "the tracked step one position early (a fast step after it)", "train.py",
             (("        for s in range(T - tracked):\n",
               "        for s in range(T - tracked - 1):\n"),
              ("        return self._tracked_steps(h * T + T - tracked, tracked) if tracked else last\n",
               "        if tracked:\n"
               "            self._tracked_steps(h * T + T - tracked - 1, tracked)\n"
               "        return self._logged_step(h * T + T - 1, self.fast_step)\n"))),
    Mutation("unrolled_r_minus_1", "R - 1 unrolled steps instead of R", "algorithms/unrolled.py",
             (("self.tracked_steps = tuning.unroll_steps or window_steps",
               "self.tracked_steps = (tuning.unroll_steps or window_steps) - 1"),)),
    Mutation("long_no_restart", "Long Diff-through-Opt's windows not restarted from the initial weights and state",
             "algorithms/unrolled.py",
             (("        if not (self.reset_weights and window > 0):", "        if True:"),),
             ("tests/test_hypergradients.py",)),
    Mutation("sgd_weight_decay_dropped", "weight decay dropped from the differentiable SGD update",
             "algorithms/weight_update.py",
             (("            g = g + hp[\"weight_decay\"] * w\n            b = g if b is None",
               "            b = g if b is None"),)),
    Mutation("adam_weight_decay_dropped", "weight decay dropped from the differentiable Adam update",
             "algorithms/weight_update.py",
             (("            g = g + hp[\"weight_decay\"] * w\n            m = beta1",
               "            m = beta1"),)),
    Mutation("adam_beta1_constant", "Adam's beta1 a constant in the differentiable update (no hypergradient path)",
             "algorithms/weight_update.py",
             (("        beta1, beta2 = hp[\"beta1\"], hp[\"beta2\"]\n        step = state[\"step\"] + 1",
               "        beta1, beta2 = float(hp[\"beta1\"]), hp[\"beta2\"]\n        step = state[\"step\"] + 1"),)),
    Mutation("stop_not_agreed", "each rank of a --nproc job acting on its own view of a stop request",
             "train.py", (("            if asked_anywhere or", "            if asked_here or"),),
             ("tests/test_faults_interruptions.py::test_a_signalled_nproc_job_stops_every_rank_after_the_same_window",)),
    Mutation("all_reduce_averaged", "all-reduce averaged over ranks instead of summed",
             "distributed.py",
             (("        dist.all_reduce(flat)\n",
               "        dist.all_reduce(flat)\n        flat /= context.world_size\n"),),
             (DDP_IMPLICIT,)),
    Mutation("direct_path_unscaled", "the direct path of the tracked step not scaled by 1/N",
             "distributed.py",
             (("_ScaleGradient.apply(1 / context.world_size, p)", "_ScaleGradient.apply(1.0, p)"),),
             (DDP_IMPLICIT,)),
    Mutation("unrolled_adjoint_not_summed", "the adjoint of the cross-rank gradient sum not summed over ranks",
             "distributed.py",
             (("return (None, *_AllReduceSum.apply(ctx.context, *grad_outputs))", "return (None, *grad_outputs)"),),
             (DDP_UNROLLED,)),
)

# What the reported numbers rest on besides the hypergradient: measurements, the loop's settings,
# the shipped configs, data parallelism.
MEASUREMENT_MUTATIONS: tuple[Mutation, ...] = (
    Mutation("unnormalised_by_std", "the test loss in target units scaled by the target std instead of its square",
             "measure.py", (("scale = self.splits.target_std ** 2", "scale = self.splits.target_std"),),
             (f"{MEASUREMENT}::test_the_loss_in_target_units_is_a_plain_forward_on_the_raw_test_rows",)),
    Mutation("held_out_train_mode", "held-out metrics measured in training mode (BatchNorm's batch statistics)",
             "measure.py", (("        self.model.eval()\n        totals", "        totals"),),
             (f"{MEASUREMENT}::test_held_out_metrics_are_an_eval_mode_forward",)),
    Mutation("validation_loss_train_mode", "the hypergradient's validation loss computed in training mode",
             "measure.py", (("        model.eval()\n        return loss_at(weights, batch)",
                           "        return loss_at(weights, batch)"),),
             (f"{MEASUREMENT}::test_the_hypergradient_validation_gradient_is_an_eval_mode_gradient",)),
    Mutation("lr_bounds_ln", "lr bounds taken to the raw (log10) space with ln", "algorithms/hyperparameters.py",
             (("(math.log10(bound) for bound in self.lr_bounds)", "(math.log(bound) for bound in self.lr_bounds)"),),
             (f"{MEASUREMENT}::test_a_clipped_lr_trajectory_is_a_raw_step_then_a_clip_into_the_log10_bounds",)),
    Mutation("clip_before_hyper_step", "lr clipped into its bounds before the hyper-optimiser's step, not after",
             "algorithms/base.py",
             (("        self.rule.update_(self.hyperparameters.leaves(), grads, self.rule_state, "
               "self.rule_hyperparameters)\n        self.hyperparameters.clip_()\n",
               "        self.hyperparameters.clip_()\n        self.rule.update_(self.hyperparameters.leaves(), grads, "
               "self.rule_state, self.rule_hyperparameters)\n"),),
             (f"{MEASUREMENT}::test_a_clipped_lr_trajectory_is_a_raw_step_then_a_clip_into_the_log10_bounds",)),
    Mutation("first_order_at_i2", "the tracked step without second derivatives at i = 2", "algorithms/implicit.py",
             (("create_graph=self.rollback_distance > 1", "create_graph=self.rollback_distance > 2"),),
             (f"{MEASUREMENT}::test_implicit_hypergradients_at_other_i[i2]",)),
    Mutation("shipped_ours_one_term", "the shipped Ours configs with i = 1 Neumann term instead of 5",
             "configs/Ours_LR.yaml", (("rollback_distance: 5", "rollback_distance: 1"),),
             (f"{MEASUREMENT}::test_the_shipped_ours_configs_are_the_papers_settings",
              f"{MEASUREMENT}::test_implicit_hypergradients_at_other_i[shipped_i]")),
    Mutation("hyper_stream_like_training", "the hypergradient's batches seeded like the training batches",
             "datasets.py", (('"hyper": 3', '"hyper": 1'),),
             (f"{MEASUREMENT}::test_the_hypergradient_batches_are_drawn_apart_from_the_training_batches",)),
    Mutation("clip_per_shard", "each rank clipping its shard's gradient before the cross-rank sum",
             "algorithms/steps.py",
             (("    gradient = problem.sum_(list(torch.autograd.grad(loss, params)))\n",
               "    gradient = problem.sum_(clip_gradient_norm(list(torch.autograd.grad(loss, params)), "
               "problem.gradient_clip))\n"),),
             (DDP_MEASURED,)),
    Mutation("accuracy_unweighted_shards", "accuracy averaged over ranks without weighting by shard size",
             "measure.py", (("correct.mean() * batch.fraction", "correct.mean() / self.context.world_size"),),
             (DDP_MEASURED,)),
    Mutation("chunks_unweighted", "a whole split's chunks averaged without weighting by their size", "measure.py",
             (("batch.fraction * rows / len(batch.inputs) if rows else 0.0",
               "batch.fraction / -(-len(batch.inputs) // chunk_rows) if rows else 0.0"),),
             (f"{MEASUREMENT}::test_a_chunked_whole_split_evaluation_equals_one_plain_forward",)),
)

# The analysis and the baselines the paper's tables rest on (figures, 3-batching, Bayesian
# optimisation, PBT, logged summaries), checked against hand-made results with known answers.
ANALYSIS_MUTATIONS: tuple[Mutation, ...] = (
    Mutation("median_se_from_means", "the median's bootstrap standard error computed from resampled means",
             "figures.py", (("bootstrap_standard_error(kept, np.median, seed=seed)",
                             "bootstrap_standard_error(kept, np.mean, seed=seed)"),),
             (f"{ANALYSIS}::test_table_errors_are_the_bootstrap_errors_of_the_mean_and_the_median",)),
    Mutation("three_batched_on_test", "Random (3-batched) picking each triple's run by its test value",
             "figures.py", (("three_batched(values[\"Random_Validation\"], validation, seed)",
                             "three_batched(values[\"Random_Validation\"], values[\"Random_Validation\"], seed)"),),
             (f"{ANALYSIS}::test_three_batched_random_picks_the_run_with_the_best_validation_loss_not_test",)),
    Mutation("bayesopt_on_test", "Bayesian optimisation's objective read from the test split", "bayesopt.py",
             (("value = final.get(\"Unnormalised_Loss/Validation\", final.get(\"Loss/Validation\"))",
               "value = final.get(\"Unnormalised_Loss/Test\", final.get(\"Loss/Test\"))"),),
             (f"{ANALYSIS}::test_bayesian_optimisation_minimises_the_validation_loss_not_the_test_loss",)),
    Mutation("pbt_perturbation_sign", "PBT's perturbation of a copied state applied with its sign flipped",
             "algorithms/hyperparameters.py",
             (("to_raw(name, torch.tensor(new[name], dtype=torch.float64)) - to_raw(\n"
               "                name, torch.tensor(old[name], dtype=torch.float64))",
               "to_raw(name, torch.tensor(old[name], dtype=torch.float64)) - to_raw(\n"
               "                name, torch.tensor(new[name], dtype=torch.float64))"),),
             (f"{ANALYSIS}::test_a_pbt_trial_continues_the_copied_state_moved_by_its_perturbation_in_log10_and_"
              "logit_space",)),
    Mutation("per_element_lr_mean_of_means", "a per-element lr logged as the mean of each weight tensor's mean",
             "algorithms/hyperparameters.py",
             (("value = flat.mean()", "value = torch.stack([v.mean() for v in value]).mean()"),),
             (f"{ANALYSIS}::test_the_logged_per_element_lr_is_the_mean_over_every_element",)),
)

ANALYSIS_MUTATIONS += (
    Mutation("best_run_on_test", "the results table's best run picked on its test loss, not its validation loss",
             "results_table.py", (("SELECTION_TAGS = ((\"Loss/Validation\", \"validation\")",
                                   "SELECTION_TAGS = ((\"Loss/Test\", \"validation\")"),),
             ("tests/test_results_table.py",)),
    Mutation("table_median_of_all_runs", "the results table's median taken over every run, not the completed ones",
             "results_table.py", (("        if status != \"completed\" or test is None:",
                                   "        if test is None:"),),
             ("tests/test_results_table.py",)),
)

# The learning-rate-free peers, against their packages' own optimisers (tests/test_peers.py).
PEER_MUTATIONS: tuple[Mutation, ...] = (
    Mutation("peer_betas_dropped", "an Adam-like peer stepping with its package's betas, not the config's",
             "algorithms/peers.py",
             (('    return {"lr": hp["lr"], "weight_decay": hp["weight_decay"], "betas": (hp["beta1"], hp["beta2"])}',
               '    return {"lr": hp["lr"], "weight_decay": hp["weight_decay"]}'),),
             ("tests/test_peers.py::test_each_peer_ends_where_its_package_ends",)),
    Mutation("schedule_free_unswitched", "Schedule-Free measured at its training sequence, not its evaluation weights",
             "algorithms/peers.py", (('        state["optimiser"].eval()\n', "        pass\n"),),
             ("tests/test_peers.py::test_schedule_free_is_measured_at_its_evaluation_weights",)),
)
MUTATIONS = MUTATIONS + MEASUREMENT_MUTATIONS + ANALYSIS_MUTATIONS + PEER_MUTATIONS


class Stale(Exception):
    """A mutation whose original text is no longer in its file (exactly once)."""


def scratch_copy(root: Path) -> Path:
    """The repository's files (as git lists them) under root/repo, with root/shared linked."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    copy = root / "repo"
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    (root / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    return copy


def mutate(copy: Path, mutation: Mutation) -> str:
    """Apply `mutation` to the copy; returns the file's original text (to restore it)."""
    path = copy / mutation.path
    text = mutated = path.read_text()
    for original, replacement in mutation.edits:
        if mutated.count(original) != 1:
            raise Stale(f"{mutation.name}: {mutation.path} does not contain {original!r} exactly once; "
                        f"update the mutation in tests/mutations.py")
        mutated = mutated.replace(original, replacement)
    path.write_text(mutated)
    return text


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """(passed, the last line pytest printed) for `tests` run in the copy."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return result.returncode == 0, lines[-1] if lines else result.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="MUTATION", help="mutations to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to each pytest run")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<28} {m.description}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    unknown = [name for name in args.names if name not in known]
    if unknown:
        print(f"mutations.py: error: unknown mutation {unknown[0]!r}; see --list", file=sys.stderr)
        return 2
    chosen = [known[name] for name in args.names] or list(MUTATIONS)
    with tempfile.TemporaryDirectory(prefix="mutations-") as root:
        copy = scratch_copy(Path(root))
        baseline = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
        print(f"baseline: {len(baseline)} test selections on the unmutated copy ...", flush=True)
        passed, last = run_tests(copy, baseline, args.timeout)
        if not passed:
            print(f"baseline FAILED ({last}): fix the tests before checking mutations", flush=True)
            return 1
        survivors = []
        for mutation in chosen:
            start = time.perf_counter()
            try:
                original = mutate(copy, mutation)
            except Stale as error:
                print(f"mutations.py: error: {error}", file=sys.stderr)
                return 2
            try:
                passed, last = run_tests(copy, mutation.tests, args.timeout)
            finally:
                (copy / mutation.path).write_text(original)
            verdict = "SURVIVED" if passed else "caught"
            print(f"{verdict:<9} {mutation.name:<28} {time.perf_counter() - start:6.1f} s  {last}", flush=True)
            if passed:
                survivors.append(mutation.name)
    if survivors:
        print(f"{len(survivors)} of {len(chosen)} mutations survived: {', '.join(survivors)}")
        return 1
    print(f"all {len(chosen)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
