#!/usr/bin/env bash
# Runs the whole pipeline on this machine: NATS with JetStream, iac-gateway, iac-worker and
# iac-reporter, syncing the example monorepo in deploy/example-infra. Ctrl-C stops everything.
#
#   ./deploy/up.sh            build (release), start, print how to send a webhook and a sync
#   ./deploy/up.sh --smoke    same, then send one signed push and one sync, wait for both
#                             results, and stop (exit 0 when the pipeline worked)
#
# Environment (all optional): WEBHOOK_PORT (8080), NATS_PORT (4222), WEBHOOK_SECRET
# (generated into $IAC_RUN_DIR/webhook-secret), GITHUB_TOKEN (the reporter posts statuses when
# set; log-only otherwise), IAC_RUN_DIR (.run), IAC_BUILD_PROFILE (release | debug),
# IAC_BIN_DIR (use the binaries there instead of building).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
smoke=false
[[ "${1:-}" == "--smoke" ]] && smoke=true

# shellcheck source=tools.sh
source deploy/tools.sh

run_dir="$(mkdir -p "${IAC_RUN_DIR:-$root/.run}" && cd "${IAC_RUN_DIR:-$root/.run}" && pwd)"
profile="${IAC_BUILD_PROFILE:-release}"
webhook_port="${WEBHOOK_PORT:-8080}"
nats_port="${NATS_PORT:-4222}"

port_busy() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$webhook_port" "$nats_port"; do
  if port_busy "$port"; then
    echo "error: port $port is already in use (set WEBHOOK_PORT / NATS_PORT to free ones)" >&2
    exit 1
  fi
done

if [[ -n "${IAC_BIN_DIR:-}" ]]; then
  bin="$IAC_BIN_DIR"
  echo "==> using the binaries in $bin"
elif [[ "$profile" == "release" ]]; then
  echo "==> building (release)"
  cargo build --release --bins --locked
  bin="$root/target/release"
else
  echo "==> building (debug)"
  cargo build --bins --locked
  bin="$root/target/debug"
fi

# The example monorepo becomes a git repository with a bare "remote" the worker clones.
repo="$run_dir/example-infra"
remote="$run_dir/example-infra.git"
if [[ ! -d "$remote" ]]; then
  echo "==> creating the example repository in $repo"
  rm -rf "$repo"
  cp -r deploy/example-infra "$repo"
  git -C "$run_dir" init -q --bare -b main example-infra.git
  git -C "$repo" init -q -b main
  git -C "$repo" -c user.name=iac-runner -c user.email=iac-runner@example.invalid add -A
  git -C "$repo" -c user.name=iac-runner -c user.email=iac-runner@example.invalid commit -qm "example infrastructure"
  git -C "$repo" remote add origin "$remote"
  git -C "$repo" push -q origin main
fi

if [[ -z "${WEBHOOK_SECRET:-}" ]]; then
  secret_file="$run_dir/webhook-secret"
  [[ -s "$secret_file" ]] || python3 -c 'import secrets; print(secrets.token_hex(32))' >"$secret_file"
  WEBHOOK_SECRET="$(cat "$secret_file")"
fi
export WEBHOOK_SECRET

mkdir -p "$run_dir/nats" "$run_dir/workspace" "$run_dir/logs" "$run_dir/state"
cat >"$run_dir/nats.conf" <<CONF
listen: 127.0.0.1:$nats_port
jetstream { store_dir: "$run_dir/nats" }
CONF

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping"
  # The services first (a running task may finish and its result be stored), NATS last.
  local services=("${pids[@]:1}")
  for pid in "${services[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${services[@]}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

start() { # name command...
  local name="$1"
  shift
  "$@" >"$run_dir/logs/$name.log" 2>&1 &
  pids+=("$!")
  echo "    $name (pid $!) -> $run_dir/logs/$name.log"
}

export NATS_URL="nats://127.0.0.1:$nats_port"
export GIT_BRANCH=main
echo "==> starting"
start nats-server nats-server -c "$run_dir/nats.conf"
start iac-gateway env WEBHOOK_PORT="$webhook_port" WEBHOOK_BIND=127.0.0.1 "$bin/iac-gateway"
start iac-worker env -u WEBHOOK_SECRET -u GITHUB_TOKEN GIT_REPO_URL="$remote" WORKSPACE="$run_dir/workspace" \
  SYNC_COMMAND="$root/.venv/bin/invoke {task}" IAC_EXAMPLE_STATE="$run_dir/state" TASK_ENV_PASS=IAC_EXAMPLE_STATE "$bin/iac-worker"
start iac-reporter env -u WEBHOOK_SECRET GITHUB_REPO=example/infra "$bin/iac-reporter"

for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$webhook_port/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$webhook_port/ready" >/dev/null || {
  echo "error: the gateway did not become ready; see $run_dir/logs/" >&2
  exit 1
}

if $smoke; then
  rm -f "$run_dir"/state/*.hash
  echo "==> smoke: a signed push changing platform/01.postgres/compose.yaml"
  IAC_RUN_DIR="$run_dir" WEBHOOK_PORT="$webhook_port" IAC_BIN="$bin" deploy/example-push.sh platform/01.postgres/compose.yaml
  body='{"services":["platform/redis"]}'
  echo "==> smoke: a signed manual sync of platform/redis"
  curl -sS -X POST "http://127.0.0.1:$webhook_port/sync" -H "Content-Type: application/json" \
    -H "X-Hub-Signature-256: $("$bin/iac-gateway" sign "$body")" -d "$body"
  echo
  # The example tasks record each deploy's config hash in $run_dir/state: both must appear.
  for _ in $(seq 600); do
    [[ -s "$run_dir/state/platform__postgres.hash" && -s "$run_dir/state/platform__redis.hash" ]] && break
    sleep 0.1
  done
  if [[ -s "$run_dir/state/platform__postgres.hash" && -s "$run_dir/state/platform__redis.hash" ]]; then
    echo "==> smoke: platform/postgres (push) and platform/redis (manual sync) deployed"
    exit 0
  fi
  echo "error: the syncs did not finish; logs:" >&2
  tail -n 50 "$run_dir"/logs/*.log >&2
  exit 1
fi

cat <<INFO

iac-runner is running (logs in $run_dir/logs/, Ctrl-C stops everything).

  example repository: $repo  (remote $remote)
  gateway:            http://127.0.0.1:$webhook_port   (GET /health, /ready, /metrics)
  NATS:               $NATS_URL
  reporter:           $([[ -n "${GITHUB_TOKEN:-}" ]] && echo "posting GitHub statuses" || echo "log-only (set GITHUB_TOKEN to post statuses)")

Send a signed manual sync:
  BODY='{"services":["platform/postgres"]}'
  curl -X POST http://127.0.0.1:$webhook_port/sync -H 'Content-Type: application/json' \\
    -H "X-Hub-Signature-256: \$(WEBHOOK_SECRET=\$(cat $run_dir/webhook-secret) $bin/iac-gateway sign "\$BODY")" -d "\$BODY"

Or publish one with the nats CLI:
  nats --server $NATS_URL pub iac.events.sync '{"all": true}'

Change a file in the example repository, push it and send the signed push webhook:
  IAC_RUN_DIR=$run_dir WEBHOOK_PORT=$webhook_port IAC_BIN=$bin ./deploy/example-push.sh platform/01.postgres/compose.yaml

Follow what happens:
  tail -f $run_dir/logs/*.log
INFO

wait
