#!/usr/bin/env bash
# Installs what the browser test layer needs: Debian's chromium (Playwright drives it; its own browser download is
# not reachable). Playwright itself comes with scripts/requirements-dev.txt. Idempotent and quiet when done before.
# When Chromium cannot be installed here (not root, no apt-get), the reason is written to
# $MOS_RUNTIME/browser-unavailable and the browser tests skip with it; otherwise a missing browser fails them.
set -uo pipefail
RT="${MOS_RUNTIME:-$HOME/.cache/mixofshow-runtime}"
MARKER="$RT/browser-unavailable"
log() { printf '[mixofshow setup] %s\n' "$*" >&2; }
mkdir -p "$RT"
for candidate in /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
  if [ -x "$candidate" ]; then rm -f "$MARKER"; exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no Chromium and no apt-get to install Debian's chromium package" > "$MARKER"
elif [ "$(id -u)" != 0 ]; then
  echo "no Chromium, and installing Debian's chromium package needs root (sudo apt-get install chromium)" > "$MARKER"
else
  log "installing Debian's chromium for the browser tests (about 40 s)"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >"$RT/apt-chromium.log" 2>&1; then
    rm -f "$MARKER"
    exit 0
  fi
  log "apt-get install chromium failed; see $RT/apt-chromium.log"
  rm -f "$MARKER"  # root with apt-get: a failure here must fail the browser tests, not skip them
fi
[ -f "$MARKER" ] && log "browser tests will be skipped: $(cat "$MARKER")"
exit 0
