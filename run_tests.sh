#!/usr/bin/env bash
# Run the test suite on the CPU. Creates (or reuses) the virtual environment .venv, installs the
# project with its test dependencies, and runs pytest. Kernel tests run the Triton kernels in
# Triton's interpreter (TRITON_INTERPRET=1), so no GPU is needed; GPU-only tests skip.
#
# Usage: ./run_tests.sh [pytest arguments, e.g. -k kernel or tests/test_model.py]
#
# Environment: TORCH_SPEC (default torch==2.13.0), PYTHON_BASE (default python3), VENV (default .venv)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
py="$(ensure_venv "$VENV_EXTRAS")"

status=0
"$py" -m pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "error: no tests ran" >&2
fi
exit $status
