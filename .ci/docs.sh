#!/usr/bin/env bash
# CI: the API reference built from the docstrings, warnings as errors. Runs in the venv .ci/run created; the
# docs extra is read from pyproject.toml and installed alone (griffe reads python/ statically, so
# `pip install -e .[docs]`, which would rebuild the package, is not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t extras < <(python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))')
python -m pip install -q "${extras[@]}"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir build/site
