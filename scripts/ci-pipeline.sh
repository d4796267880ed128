#!/usr/bin/env bash
# CI's reproduction of the main job (scripts/run-pipeline.sh) in three phases, each one
# workflow step (and one .ci/run step) with its own duration and artifacts:
#   data     materialise data/raw, then describe, tile, split, validate (Data Docs)
#   learn    search, train_cnn, corpus, pretrain, train_resnet, train_seg, evaluate
#   explain  the Grad-CAM exports and localization metrics, the segmentation's scores
#            (against Grad-CAM's), register, promote, then track (MLflow runs of stages DVC
#            may skip)
# Every stage is forced (--force --single-item, in dvc.yaml's order): outputs committed to
# git (metrics, search results, registry records) are really recomputed, not skipped.
# `scripts/ci-pipeline.sh PHASE --list` prints the phase's stage patterns and runs nothing.
# tests/test_workflow.py checks that the three phases cover dvc.yaml's stages, in order.
set -euo pipefail
phase="${1:?usage: scripts/ci-pipeline.sh data|learn|explain [--list]}"
case "$phase" in
  data)
    stages=(describe tile split validate) ;;
  learn)
    stages=('search@*' 'train_cnn@*' corpus 'pretrain@*' 'train_resnet@*' 'train_seg@*' 'evaluate@*') ;;
  explain)
    stages=('explain@*' 'evaluate_seg@*' 'register@*' 'promote@*' 'track@*') ;;
  *)
    echo "error: unknown phase '$phase' (data, learn or explain)" >&2
    exit 2 ;;
esac
if [ "${2:-}" = "--list" ]; then
  printf '%s\n' "${stages[@]}"
  exit 0
fi
source "$(dirname "$0")/env.sh"
if [ "$phase" = data ]; then
  bash "$(dirname "$0")/materialise-data.sh"
fi
dvc repro --force --single-item --glob "${stages[@]}"
