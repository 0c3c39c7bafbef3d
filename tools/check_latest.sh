#!/usr/bin/env bash
# Install the NEWEST release of every dependency into a fresh venv and run the test suite.
#
#   tools/check_latest.sh [VENV_DIR] [-- PYTEST_ARGS...]
#
# VENV_DIR (default: a new directory under /tmp) must not exist yet. The README's install
# line pins what CI last passed with (constraints.txt); this is the other half: what a user
# who installs today without the constraints file gets. torch stays the CPU build that
# the README installs (torch==2.13.0, see /work/shared/ASSETS.md: a bare `torch` resolves to
# a 5 GB CUDA build, and the machines cap torch at 2.14.1); everything else is unpinned.
# It prints the resolved versions (also saved as VENV_DIR/versions.txt), then runs the
# default pytest run (or PYTEST_ARGS) from the repository root, and exits with its status.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then venv=$1; shift; fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
if [ -z "$venv" ]; then
  venv=$(mktemp -d /tmp/spdelta-latest.XXXXXX) && rmdir "$venv"
fi
if [ -e "$venv" ]; then
  echo "check_latest: $venv exists; give a new directory (it is created here)" >&2
  exit 2
fi

python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
# No -c constraints.txt: every other dependency resolves to its newest release.
python -m pip install --quiet -e "$root[test,demo,train]"
python -m pip freeze --exclude-editable > "$venv/versions.txt"
echo "check_latest: newest releases installed in $venv:"
grep -iE '^(torch|transformers|safetensors|datasets|peft|torchao|tokenizers|huggingface.hub|accelerate|numpy|hypothesis|pytest)==' \
  "$venv/versions.txt" | sed 's/^/  /'
cd "$root"
python -m pytest -q -p no:cacheprovider "$@"
