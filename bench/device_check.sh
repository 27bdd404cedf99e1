#!/usr/bin/env bash
# The device check, in one call from a fresh checkout on a machine with one or more NVIDIA GPUs:
#
#     bash bench/device_check.sh            # about 5 to 8 minutes
#
# Uses the first Python whose torch sees CUDA ($PYTHON, .venv/bin/python, python3, python); with
# none, makes .venv-gpu and pip-installs torch==2.13.0 (PyPI's Linux wheel is the CUDA build) and
# the Pipfile's packages. Then runs bench/device_check.py: the ground-truth tests on CUDA, CPU vs
# CUDA for every algorithm, 2 ranks vs 1, steps/s and peak GPU memory of the three workloads.
# The report goes to $OUT/device_check.md if OUT is set, else bench/device_check_results.md, and
# is printed at the end. Exit status: 0 all passed, 1 a check failed, 2 no CUDA or no install.
set -uo pipefail
cd "$(dirname "$0")/.."

PACKAGES="higher==0.2.1 pyyaml tensorboard google-crc32c numpy tqdm matplotlib scikit-learn scipy bayesian-optimization pytest"
MODULES="higher yaml tensorboard numpy tqdm matplotlib sklearn scipy bayes_opt pytest"

has_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python .venv-gpu/bin/python python3 python; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then
        PY="$candidate"; break
    fi
done
if [ -z "$PY" ]; then
    echo "device_check.sh: no Python here has torch with CUDA; installing torch==2.13.0 into .venv-gpu" >&2
    python3 -m venv .venv-gpu && .venv-gpu/bin/python -m pip install -q torch==2.13.0 $PACKAGES \
        || { echo "device_check.sh: error: could not install torch==2.13.0 (CUDA build)" >&2; exit 2; }
    PY=.venv-gpu/bin/python
    has_cuda "$PY" || { echo "device_check.sh: error: torch is installed, but sees no GPU (nvidia-smi?)" >&2; exit 2; }
fi
missing=$("$PY" -c "
import importlib.util
print(' '.join(m for m in '$MODULES'.split() if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "device_check.sh: installing the Pipfile's packages (missing: $missing)" >&2
    "$PY" -m pip install -q $PACKAGES || { echo "device_check.sh: error: could not install $missing" >&2; exit 2; }
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# The whole check stays under 8 minutes: each part has its own limit inside, and this is the last word.
timeout -k 10 420 "$PY" bench/device_check.py --device cuda --budget 330 "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "device_check.sh: timed out after 420 s; the report holds the parts that finished:" >&2
    cat "${OUT:+$OUT/device_check.md}" 2>/dev/null || cat bench/device_check_results.md 2>/dev/null
fi
exit "$status"
