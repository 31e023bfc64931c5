#!/usr/bin/env bash
# Install everything from nothing into a virtual environment and run every check CI runs.
#   BANKLLM_DATA_DIR=../shared/data bash tools/check.sh
# Env: BANKLLM_VENV (default .venv), BANKLLM_TEST_FLAGS (extra nbdev-test flags, e.g. "slow").
# Without BANKLLM_DATA_DIR, or when that folder is missing, the loaders download the public data sets and cache them
# (BANKLLM_CACHE_DIR, default ~/.cache/bankllm): the first run then needs the internet.
set -euo pipefail
step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

# A relative data dir is relative to where the command was typed: make it absolute once, before moving anywhere
# (nbdev-test runs each notebook from inside nbs/).
case "${BANKLLM_DATA_DIR:-}" in ""|/*) ;; *) BANKLLM_DATA_DIR="$PWD/$BANKLLM_DATA_DIR" ;; esac
cd "$(dirname "$0")/.."
VENV=${BANKLLM_VENV:-.venv}
export BANKLLM_DATA_DIR=${BANKLLM_DATA_DIR:-$(cd .. && pwd)/shared/data}
if [ -d "$BANKLLM_DATA_DIR" ]; then echo "data: $BANKLLM_DATA_DIR"
else echo "data: $BANKLLM_DATA_DIR does not exist: the loaders download the data sets and cache them (needs the internet once)"; fi
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step "install into $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --disable-pip-version-check "torch==2.13.0"   # the CPU build first, or pip pulls a CUDA one
pip install -q --disable-pip-version-check -e ".[dev,qlora]"
python -c "import torch, bankllm; print('torch', torch.__version__, '| bankllm', bankllm.__version__)"

tracked_clean() { # fail when a generator changed files that are committed (or added new ones)
  local what=$1; shift
  local diff; diff=$(git status --porcelain -- "$@")
  [ -z "$diff" ] || { git --no-pager diff --stat -- "$@"; echo "$diff"; fail "$what left a diff: run it and commit the result"; }
}
step "the work tree is clean before the checks"
tracked_clean "an earlier step" bankllm nbs README.md
step "nbdev-export leaves no diff"
nbdev-export
tracked_clean nbdev-export bankllm nbs
step "nbdev-clean leaves no diff"
nbdev-clean
tracked_clean nbdev-clean nbs
step "README.md matches nbs/index.ipynb"
python tools/readme.py --check

step "ruff (lint: the package, the notebooks, tests and tools; rules in pyproject.toml)"
ruff check bankllm nbs tools tests

# Shipped records (checkpoints' dev_quality.json, benchmarks/, the docs' figures) change only on purpose: runs write to
# a scratch copy (`bankllm.config.record_path`) unless BANKLLM_UPDATE_SHIPPED=1 asks for the shipped file.
shipped_unchanged() {
  local diff; diff=$(git status --porcelain -- bankllm/checkpoints benchmarks nbs/images)
  [ -z "$diff" ] || { echo "$diff"; fail "$1 rewrote shipped records: runs must write to record_path(...); restore them with git checkout"; }
}
step "nbdev-test (notebooks)"
timeout 1500 nbdev-test --do-print --timing ${BANKLLM_TEST_FLAGS:+--flags "$BANKLLM_TEST_FLAGS"}
[ -n "${BANKLLM_UPDATE_SHIPPED:-}" ] || shipped_unchanged nbdev-test
step "pytest (tests/)"
timeout 1200 python -m pytest -q -rs tests
[ -n "${BANKLLM_UPDATE_SHIPPED:-}" ] || shipped_unchanged pytest
step "nbdev-proc-nbs (docs processing; Quarto renders the site where it exists)"
# nbdev offers to install Quarto when it is missing; here that fails harmlessly (offline, no sudo) and the
# processed notebooks still land in _proc/. One worker: with forked workers an error in a notebook's docs
# (e.g. a show_doc that cannot resolve an annotation) deadlocked the pool instead of failing.
timeout 600 nbdev-proc-nbs --n-workers 0
tracked_clean nbdev-proc-nbs nbs
[ -f _proc/index.ipynb ] || fail "nbdev-proc-nbs produced no _proc/index.ipynb"
step "all checks passed"
