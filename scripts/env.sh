# Sourced by the run-* scripts: create/refresh the project's virtual environment and set
# the offline, quiet environment every tool here expects.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${BONEDAMAGE_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="${BONEDAMAGE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.bonedamage-install"
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "== installing bonedamage and its pinned dependencies (torch from the local wheel store)"
  # torch 2.14.1 on x86_64 is a CUDA build: the venv takes about 6.6 GiB (measured)
  free_kib="$(df -Pk "$VENV" 2>/dev/null | awk 'NR == 2 {print $4}')" || free_kib=""
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
    echo "warning: $((free_kib / 1024)) MiB free for $VENV; the install needs about 8 GiB" \
      "(6.6 GiB of packages plus pip's unpacking) and fails with 'No space left on device'" \
      "below that" >&2
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  # Quantus (explanation metrics) requires the GUI build of OpenCV, which needs libGL and
  # overwrites the headless build that grad-cam requires; lightly (SimSiam's heads and loss)
  # requires PyTorch Lightning and Hydra, which the modules used here do not import: both
  # alone, without their deps (the others are pinned above)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
    quantus lightly 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import bonedamage, torch, torchvision, dvc, monai, quantus, lightly" \
    || { echo "error: the environment in $VENV is incomplete" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export DVC_NO_ANALYTICS=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export GX_ANALYTICS_ENABLED=False
export PYTHONHASHSEED=0
