#!/usr/bin/env bash
# Set up and run the checks: ruff (lint + format) and the pytest suite.
source "$(dirname "$0")/env.sh"
echo "== ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "== pytest"
pytest -q "$@"
