#!/usr/bin/env bash
# Set up and run the checks: ruff (lint + format) and the pytest suite.
source "$(dirname "$0")/env.sh"
echo "== ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "== pytest"
# Two worker processes (pytest-xdist; the CI machine has 2 cores): each starts on its half of
# the tests, slow files first (conftest.py), and takes over the other's when it runs out.
# `-n 0` runs them in one process.
pytest -q -n 2 --dist worksteal "$@"
