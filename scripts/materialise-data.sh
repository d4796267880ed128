#!/usr/bin/env bash
# Materialise the versioned raw data (data.dvc): the DVC cache, else the DVC remote, else
# rebuild it with the phantom generator and check it against data.dvc byte for byte.
# Expects scripts/env.sh sourced (the .venv on PATH).
set -euo pipefail
if [ -d data/raw ] && dvc status --quiet data.dvc 2>/dev/null; then
  echo "== data/raw matches data.dvc"
elif dvc checkout --quiet data.dvc 2>/dev/null; then
  echo "== data/raw restored from the DVC cache"
elif dvc pull --quiet data.dvc 2>/dev/null; then
  echo "== data/raw pulled from the DVC remote"
else
  echo "== no DVC remote copy of data/raw: rebuilding it with 'bonedamage synth'"
  bonedamage synth --force
  # Hash the rebuilt folder into the cache; data.dvc must come out unchanged.
  recorded="$(mktemp)"
  cp data.dvc "$recorded"
  dvc commit --force --quiet data.dvc
  if ! cmp -s data.dvc "$recorded"; then
    diff "$recorded" data.dvc >&2 || true
    cp "$recorded" data.dvc
    echo "error: the regenerated data/raw does not match data.dvc (a reproducibility bug)" >&2
    exit 1
  fi
  rm -f "$recorded"
  echo "== data/raw rebuilt: identical to the version in data.dvc"
  # .ci/run: the tests may take these freshly synthesised phantoms (BONEDAMAGE_SYNTH_DATA)
  if [ -n "${BONEDAMAGE_SYNTH_DONE:-}" ]; then
    printf '%s\n' "$PWD/data/raw" > "$BONEDAMAGE_SYNTH_DONE"
  fi
fi
