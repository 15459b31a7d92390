# Shared by the top-level scripts: usage text, path checks, and the Python to run.
# Sourced, not executed.

# The script's header comment (everything before `set -euo pipefail`) is its manual.
print_usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 1
}

# require_path PATH VARIABLE WHAT: stop with one line naming the path and the variable to change.
require_path() {
  [[ -e "$1" ]] || die "$3 not found: $1 (set $2 at the top of $(basename "$0") or in the environment)"
}

# The Python that has this project installed: $PYTHON, else the repository's .venv, else python3.
pick_python() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$root/.venv/bin/python" ]]; then
    echo "$root/.venv/bin/python"
  else
    echo python3
  fi
}

# Handle -h/--help for a script whose only arguments are extra flags passed to the CLI.
handle_help() {
  case "${1:-}" in -h|--help) print_usage; exit 0 ;; esac
}

# OpenMP threads that wait for work sleep at once instead of spinning first. On a machine shared
# with other work, spinning threads take the cores the others need: two 2-thread trainings on two
# cores ran at a fifth of the speed of two 1-thread ones, and at 0.95 of it with passive waiting,
# which alone was also the fastest setting (benchmarks/threads.py, results/threads_cpu.json). A
# value already in the environment is kept.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# The optional extras the quick start and the tests install (one set, so neither reinstalls the other's).
VENV_EXTRAS="test,plot,hf,eval,parquet"

# ensure_venv EXTRAS: create or reuse .venv, install torch if it is missing ($TORCH_SPEC, default
# torch==2.13.0), then this project with the given extras; reinstalls only when pyproject.toml
# changes. Prints the venv's python on stdout (progress goes to stderr).
ensure_venv() {
  local extras="$1" root venv py stamp want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${VENV:-$root/.venv}"
  py="$venv/bin/python"
  if [[ ! -x "$py" ]]; then
    local base="${PYTHON_BASE:-python3}"
    "$base" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
      || die "Python 3.10 or newer is needed (found: $("$base" --version 2>&1)); set PYTHON_BASE"
    echo "creating virtual environment $venv" >&2
    "$base" -m venv "$venv" >&2
    "$py" -m pip install -q --upgrade pip >&2
  fi
  if ! "$py" -c 'import torch' 2>/dev/null; then
    echo "installing ${TORCH_SPEC:-torch==2.13.0} (once)" >&2
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
    "$py" -m pip install -q ${TORCH_SPEC:-torch==2.13.0} >&2
  fi
  stamp="$venv/.llama3-installed"
  want="$(cat "$root/pyproject.toml" | cksum) [$extras]"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "installing llama3 and its dependencies" >&2
    "$py" -m pip install -q -e "$root[$extras]" >&2
    echo "$want" > "$stamp"
  fi
  echo "$py"
}
