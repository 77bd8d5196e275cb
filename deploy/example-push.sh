#!/usr/bin/env bash
# Changes a file in the local example repository (made by ./deploy/up.sh), pushes the commit
# and sends GitHub's push webhook for it, signed with the local secret.
#
#   ./deploy/example-push.sh platform/01.postgres/compose.yaml
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run_dir="${IAC_RUN_DIR:-$root/.run}"
bin="${IAC_BIN:-$root/target/release}"
port="${WEBHOOK_PORT:-8080}"
repo="$run_dir/example-infra"
path="${1:?usage: example-push.sh <path in the example repository>}"
[[ -d "$repo/.git" ]] || { echo "error: $repo does not exist: run ./deploy/up.sh first" >&2; exit 1; }
export WEBHOOK_SECRET="${WEBHOOK_SECRET:-$(cat "$run_dir/webhook-secret")}"

git_() { git -C "$repo" -c user.name=iac-runner -c user.email=iac-runner@example.invalid "$@"; }
before="$(git_ rev-parse HEAD)"
mkdir -p "$(dirname "$repo/$path")"
echo "# changed $(date -u +%FT%TZ)" >>"$repo/$path"
git_ add -A
git_ commit -qm "change $path"
git_ push -q origin main
after="$(git_ rev-parse HEAD)"

body=$(cat <<JSON
{"ref":"refs/heads/main","before":"$before","after":"$after","repository":{"full_name":"example/infra"},"pusher":{"name":"example-push"},"head_commit":{"id":"$after","added":[],"removed":[],"modified":["$path"]},"commits":[{"id":"$after","added":[],"removed":[],"modified":["$path"]}]}
JSON
)
delivery="$(python3 -c 'import uuid; print(uuid.uuid4())')"
curl -sS -X POST "http://127.0.0.1:$port/webhook" \
  -H "Content-Type: application/json" -H "X-GitHub-Event: push" -H "X-GitHub-Delivery: $delivery" \
  -H "X-Hub-Signature-256: $("$bin/iac-gateway" sign "$body")" -d "$body"
echo
