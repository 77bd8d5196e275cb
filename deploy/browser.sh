#!/usr/bin/env bash
# Installs headless Chromium (the Debian package) for the run-page browser tests; sourced by
# deploy/tools.sh when IAC_BROWSER=1 (tests/run.sh sets it). Where it cannot be installed
# (no apt-get, not root), it says why in IAC_BROWSER_UNAVAILABLE: the browser tests then skip
# with that message; without it, a missing browser fails them.

if command -v chromium >/dev/null 2>&1; then
  export CHROMIUM_BIN="$(command -v chromium)"
elif ! command -v apt-get >/dev/null 2>&1; then
  export IAC_BROWSER_UNAVAILABLE="chromium is not installed and there is no apt-get to install it"
elif [[ "$(id -u)" != 0 ]] && ! sudo -n true 2>/dev/null; then
  export IAC_BROWSER_UNAVAILABLE="chromium is not installed and apt-get needs root: run 'sudo apt-get install chromium fonts-dejavu-core'"
else
  echo "==> installing chromium (Debian package) for the browser tests"
  as_root=()
  [[ "$(id -u)" != 0 ]] && as_root=(sudo -n)
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
  export CHROMIUM_BIN="$(command -v chromium)"
fi
if [[ -n "${IAC_BROWSER_UNAVAILABLE:-}" ]]; then
  echo "==> browser tests will be skipped: $IAC_BROWSER_UNAVAILABLE" >&2
fi
