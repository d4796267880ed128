#!/usr/bin/env bash
# After `dvc repro` and `bonedamage gate` in a fresh clone: did the committed results come
# back? Every recorded hash (dvc.lock, data.dvc), metrics and registry record must come back
# byte for byte on the platform that made them (the gate read it from the metrics'
# `platform` and says in gate.json whether this machine's is the same). On another CPU type
# the learning stages take other floating-point paths (the gate then applied its
# cross-platform tolerances), so only the data preparation, which no platform changes, must
# come back exactly.
#   usage: scripts/check-reproduction.sh GATE_JSON DIFF_OUT
# Expects scripts/env.sh sourced (the .venv on PATH). Exit 1 with the differences listed.
set -euo pipefail
gate_json="$1" diff_out="$2"
same="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["same_platform"])' \
  "$gate_json")"
if [ "$same" = "True" ]; then
  git status --porcelain -- metrics registry dvc.lock data.dvc > "$diff_out"
else
  echo "== another platform than the committed results': checking the data stages only"
  git status --porcelain -- data.dvc > "$diff_out"
  # the data phase's dvc.lock entries: their deps, params and outputs (metrics included)
  python - "$diff_out" $(bash "$(dirname "$0")/ci-pipeline.sh" data --list) <<'PY'
import subprocess
import sys

import yaml

head = subprocess.run(
    ["git", "show", "HEAD:dvc.lock"], capture_output=True, text=True, check=True
).stdout
then = yaml.safe_load(head)["stages"]
with open("dvc.lock") as f:
    now = yaml.safe_load(f)["stages"]
with open(sys.argv[1], "a") as diff:
    for stage in sys.argv[2:]:
        if then.get(stage) != now.get(stage):
            diff.write(f"dvc.lock: stage {stage} differs from HEAD's\n")
PY
fi
if [ -s "$diff_out" ]; then
  cat "$diff_out"
  git --no-pager diff -- metrics registry dvc.lock data.dvc
  echo "error: the reproduced results differ from the committed ones" >&2
  exit 1
fi
echo "== reproduced: $([ "$same" = "True" ] && echo "every committed result" || echo "the data stages"), byte for byte"
