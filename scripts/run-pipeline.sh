#!/usr/bin/env bash
# The main job: set up, materialise the versioned raw data (DVC cache or remote, else
# rebuild it from the phantom generator and check it against data.dvc), then run the DVC
# pipeline.
source "$(dirname "$0")/env.sh"
bash "$(dirname "$0")/materialise-data.sh"
# BONEDAMAGE_REPRO_ARGS=--force runs every stage, including those whose outputs are
# committed to git (metrics, search results), so the metrics are really reproduced.
dvc repro ${BONEDAMAGE_REPRO_ARGS:-}
dvc status
