#!/usr/bin/env bash
# The test command: pinned tools, format, lint, then every test against real NATS, git and invoke.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=../deploy/tools.sh
IAC_BROWSER=1 source deploy/tools.sh

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries the process-level tests start)"
cargo build --workspace --bins --locked

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
  # nextest does not run doctests
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi

echo "==> benchmarks, once each on a tiny input (they measure with: cargo bench)"
cargo test --workspace --benches --locked
