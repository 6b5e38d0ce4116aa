#!/usr/bin/env bash
# Make sure Debian's Chromium is installed, for the dashboard's browser test
# (tests/e2e/test_dashboard.py drives /usr/bin/chromium with Playwright; `playwright install`
# is not used). Idempotent: returns at once when /usr/bin/chromium exists. Installs the Debian
# packages chromium and chromium-driver with apt-get (as root, or with sudo); `apt-get update`
# runs only when the first install fails (e.g. a fresh machine with empty package lists).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
PACKAGES=(chromium chromium-driver)

log() { printf 'browser: %s\n' "$*"; }

if [[ -x "$CHROMIUM" ]]; then
  log "$CHROMIUM is installed"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || {
  printf 'browser: error: %s missing and apt-get not found; install Chromium by hand\n' \
    "$CHROMIUM" >&2
  exit 1
}
if [[ "$(id -u)" -eq 0 ]]; then
  SUDO=()
else
  SUDO=(sudo)
fi
install() {
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}
log "apt-get install ${PACKAGES[*]}"
if ! install; then
  log "install failed; apt-get update, then again"
  "${SUDO[@]}" apt-get update -qq
  install
fi
[[ -x "$CHROMIUM" ]] || { printf 'browser: error: %s still missing\n' "$CHROMIUM" >&2; exit 1; }
log "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
