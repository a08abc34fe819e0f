#!/usr/bin/env bash
# CI: lint and format checks, versions pinned as in .pre-commit-config.yaml. Python: ruff's lint and format
# check (pyproject.toml [tool.ruff]); C++/CUDA: clang-format (.clang-format) over csrc/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q ruff==0.17.6 clang-format==23.1.5
status=0
ruff check . || status=1
ruff format --check . || status=1
find csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 \
  | xargs -0 clang-format --dry-run -Werror || status=1
exit "$status"
