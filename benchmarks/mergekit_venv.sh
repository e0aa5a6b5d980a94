#!/usr/bin/env bash
# A separate virtualenv with mergekit, the peer that tests/test_mergekit_parity.py and benchmarks/merge.py check
# the merge recipes against. It never touches the project's .venv and downloads no torch: a .pth file puts the
# project's site-packages at the END of the new venv's path, so mergekit runs on the project's torch while its
# own dependencies (transformers, accelerate, ...: about 200 MB, ~15 s) shadow anything older in .venv. pip
# sees that torch as installed; the constraint pins it to the project's version anyway.
#
#   bash benchmarks/mergekit_venv.sh [VENV]      (default build/mergekit-venv; needs the project's .venv)
# It always builds afresh; `make mergekit` calls it only when the venv is missing or older than this script.
set -euo pipefail

VENV=${1:-build/mergekit-venv}
MERGEKIT_VERSION=0.1.5
PROJECT_PYTHON=.venv/bin/python

project_site=$("$PROJECT_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_version=$("$PROJECT_PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
base_python=$("$PROJECT_PYTHON" -c 'import sys; print(sys._base_executable)')  # same ABI as .venv's wheels

rm -rf "$VENV"
"$base_python" -m venv "$VENV"
venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
realpath "$project_site" > "$venv_site/soups_project_site.pth"
echo "torch==$torch_version" > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$VENV/constraints.txt" \
    "mergekit==$MERGEKIT_VERSION"

# Refuse a venv that grew its own torch: that would be gigabytes nobody asked for.
"$VENV/bin/python" - "$project_site" <<'EOF'
import sys
from pathlib import Path

import torch

if not Path(torch.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()):
    sys.exit(f"mergekit venv installed its own torch at {torch.__file__}; remove it")
EOF
touch "$VENV/.installed"
