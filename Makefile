# The two Quickstart commands (`make quickstart`, `make test`) each set up the environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.synced
RAY_STAMP := $(VENV)/.synced-ray
PEERS_STAMP := $(VENV)/.synced-peers
PIPENV := PIPENV_VENV_IN_PROJECT=1 PIPENV_NOSPIN=1 PIPENV_YES=1 $(PYTHON) -m pipenv

.PHONY: quickstart test mutation-check lint data bench ray peers lightning

# Install exactly what Pipfile.lock pins (torch 2.13.0, CPU build) into ./.venv: the packages and
# dev-packages categories, not the optional [ray] and [peers] ones; then this repository itself,
# editable, for the onepass-* commands (pyproject.toml).
$(STAMP): Pipfile Pipfile.lock
	$(PYTHON) -m pip install --quiet pipenv
	$(PIPENV) sync --categories "packages dev-packages"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Optional: Ray Tune (about 0.5 GB) for `--backend ray`, ASHA and PBT, and their tests.
ray: $(RAY_STAMP)
$(RAY_STAMP): $(STAMP)
	$(PIPENV) sync --categories ray
	touch $@

# Optional: the learning-rate-free optimisers (Prodigy, D-Adaptation, Schedule-Free; a few hundred
# kB, on the pinned torch) that `run_all.py peers` compares against, and their tests.
peers: $(PEERS_STAMP)
$(PEERS_STAMP): $(STAMP)
	$(PIPENV) sync --categories peers
	touch $@

# Optional: Lightning, for examples/optimiser_lightning.py (the drop-in optimiser under manual
# optimisation) and its test; pinned here and in pyproject's [lightning] extra, on the pinned torch.
LIGHTNING_STAMP := $(VENV)/.synced-lightning
lightning: $(LIGHTNING_STAMP)
$(LIGHTNING_STAMP): $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 lightning==2.6.6
	touch $@

quickstart: $(STAMP)
	$(PY) train.py -c configs/diabetes.yaml configs/Ours_LR_Momentum.yaml

test: $(STAMP)
	$(PY) -m pytest

# Inject the hypergradient bugs that matter into a scratch copy; fails if the tests miss one.
mutation-check: $(STAMP)
	$(PY) tests/mutations.py

lint: $(STAMP)
	$(PY) -m ruff check .

# Process the raw files from a local copy: the UCI sets, Fashion-MNIST and Penn Treebank's offline
# variant (CIFAR-10 and the full Penn Treebank: download_and_process_data.py cifar10 penn_treebank).
SOURCE ?= ../shared/data
data: $(STAMP)
	$(PY) download_and_process_data.py --source $(SOURCE)
	$(PY) download_and_process_data.py fashion_mnist penn_treebank_small --source $(SOURCE)

bench: $(STAMP)
	$(PY) bench/bench_core.py
	$(PY) bench/bench_algorithms.py --workload uci_energy
	$(PY) bench/bench_algorithms.py --workload fashion_mnist_sized
	$(PY) bench/bench_distributed.py
	$(PY) bench/bench_workloads.py
	$(PY) bench/bench_batch.py
	$(PY) bench/bench_get_tags.py
	$(PY) bench/bench_threads.py
	$(PY) bench/bench_optim.py
