#!/usr/bin/env bash
# Run the architecture coverage tests against the newest releases of transformers and its stack,
# in .venv-upstream/ (beside the pinned .venv/, which it leaves alone). CI never runs this: it
# pins what it installs (constraints/ci.txt). Run it to see what upgrading the pins would break:
#   bash scripts/upstream_check.sh            # the coverage tests
#   bash scripts/upstream_check.sh tests/     # or any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSEEMOE_VENV=.venv-upstream DEEPSEEMOE_UNPINNED=1 DEEPSEEMOE_NO_APT=1 bash scripts/setup.sh --test
.venv-upstream/bin/python -m pip install --quiet --disable-pip-version-check --upgrade transformers
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(tests/models/test_coverage.py)
.venv-upstream/bin/python -c 'import transformers; print("upstream: transformers", transformers.__version__)'
# The README describes the pinned release; everything else must hold on the newest one too.
.venv-upstream/bin/python -m pytest -q "${args[@]}" \
    --deselect tests/models/test_coverage.py::test_readme_architecture_table_is_current_for_the_pinned_transformers
