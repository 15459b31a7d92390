#!/usr/bin/env bash
# Run the test suite on the CPU. Creates (or reuses) the virtual environment .venv, installs the
# project with its test dependencies, checks the code with ruff (lint, then format), and runs
# pytest. Kernel tests run the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1), so no
# GPU is needed; GPU-only tests skip.
#
# Usage: ./run_tests.sh [pytest arguments, e.g. -k kernel or tests/unit/test_model.py]
#
# Environment: TORCH_SPEC (default torch==2.13.0), PYTHON_BASE (default python3), VENV (default .venv),
# PYTEST_WORKERS (test processes side by side; default: one per core, at most 4)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
py="$(ensure_venv "$VENV_EXTRAS")"

ruff="$(dirname "$py")/ruff"
"$ruff" check --quiet || die "ruff check found the problems above; $ruff check --fix fixes some"
"$ruff" format --check --quiet || die "ruff format would change the files above; run $ruff format"

# Test files run side by side in worker processes (pytest-xdist; --dist loadfile keeps each file,
# and its module fixtures, in one worker): one per core, at most 4. PYTEST_WORKERS=N sets the
# number, 0 or 1 runs every test in this process.
cores="$(nproc 2>/dev/null || echo 1)"
workers="${PYTEST_WORKERS:-$((cores < 4 ? cores : 4))}"
parallel=()
if [[ "$workers" -gt 1 ]]; then
  parallel=(-n "$workers" --dist loadfile)
fi

status=0
"$py" -m pytest ${parallel[@]+"${parallel[@]}"} "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "error: no tests ran" >&2
fi
exit $status
