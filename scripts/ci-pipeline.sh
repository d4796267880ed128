#!/usr/bin/env bash
# CI's reproduction of the main job (scripts/run-pipeline.sh) in three phases, each one
# workflow step (and one .ci/run step) with its own duration and artifacts:
#   data     materialise data/raw, then describe, tile, split, validate (Data Docs)
#   learn    search, train_cnn, pretrain, train_resnet, evaluate, register, promote
#   explain  the Grad-CAM exports and localization metrics
# Every stage is forced (--force --single-item, in dvc.yaml's order): outputs committed to
# git (metrics, search results, registry records) are really recomputed, not skipped.
# tests/test_workflow.py checks that the three phases cover dvc.yaml's stages, in order.
source "$(dirname "$0")/env.sh"
set -euo pipefail
phase="${1:?usage: scripts/ci-pipeline.sh data|learn|explain}"
case "$phase" in
  data)
    bash "$(dirname "$0")/materialise-data.sh"
    stages=(describe tile split validate) ;;
  learn)
    stages=('search@*' 'train_cnn@*' 'pretrain@*' 'train_resnet@*' 'evaluate@*' 'register@*'
            'promote@*') ;;
  explain)
    stages=('explain@*') ;;
  *)
    echo "error: unknown phase '$phase' (data, learn or explain)" >&2
    exit 2 ;;
esac
dvc repro --force --single-item --glob "${stages[@]}"
