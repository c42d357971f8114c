#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this):
#   formatting, clippy, rustdoc (warnings are errors in all three, and in the test build), the
#   packaging of the library crates an engine depends on, then
#   the real REAPI servers (BuildGrid, buildbox-casd, and our own `recache serve`, built first)
#   and the S3-compatible servers (moto, SeaweedFS) on 127.0.0.1, then `cargo test --workspace`
#   with the servers' addresses in the environment.
# The servers are stopped on exit, also when a step fails.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p recache-hashing`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo; echo "==> $*"; }

# Warnings are errors for our own builds (not a lint our dependents inherit). The same flags
# for every step, so each crate is compiled once per configuration.
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
export RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "client-only builds compile no server stack (issue 26 item 6)"
# An engine depends on recache-remote-cache alone: its normal dependency tree must hold no HTTP
# router (axum, matchit) and tonic without its `server` and `router` features.
client_tree=$(cargo tree --locked -p recache-remote-cache -e normal,features --prefix none)
if grep -qE '^(axum|axum-core|matchit) |tonic feature "(server|router|transport)"' <<<"$client_tree"; then
  echo "test.sh: recache-remote-cache pulls in a server stack:" >&2
  grep -E '^(axum|axum-core|matchit) |tonic feature "(server|router|transport)"' <<<"$client_tree" | sort -u >&2
  exit 1
fi
echo "recache-remote-cache: no axum, matchit or tonic server in its tree"

step "cargo doc (rustdoc warnings are errors)"
cargo doc --no-deps --workspace --locked

step "cargo build --workspace (recache serve is one of the servers the tests use)"
cargo build --workspace --locked

step "cargo package: the crates an engine depends on, each built from its packaged sources (nothing is uploaded)"
# cargo unpacks each packaged crate from its temporary registry into
# $CARGO_HOME/registry/src/-<hash of that registry's path>/ and reuses an unpacking of the same
# name and version left by an earlier run in the same folder: it would verify those older
# sources instead of these. Only local registries' folders start with '-'.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/recache-*
cargo package --locked -p recache-reapi -p recache-hashing -p recache-store -p recache-process-execution -p recache-remote-cache

step "Bazel 4.2.3 for the Bazel scenario (installed once)"
if ! scripts/install-bazel.sh; then
  # In CI a missing Bazel fails (the Bazel test would otherwise have nothing to run); on a
  # developer's machine without root the Bazel test prints SKIPPED and the rest goes on.
  [ "${CI:-}" != true ] || exit 1
  echo "test.sh: continuing without Bazel; its test will be SKIPPED (not in CI)"
fi

step "Pants 2.17.1 for the Pants scenario (installed once into .reapi/pants)"
if ! scripts/install-pants.sh; then
  # In CI a missing Pants fails (its test would otherwise have nothing to run); elsewhere the
  # Pants test prints SKIPPED and the rest goes on.
  [ "${CI:-}" != true ] || exit 1
  echo "test.sh: continuing without Pants; its test will be SKIPPED (not in CI)"
fi

step "ccache, Prometheus and Chromium for the HTTP cache, metrics and status page scenarios (installed once)"
if ! scripts/install-apt.sh ccache prometheus chromium; then
  [ "${CI:-}" != true ] || exit 1
  echo "test.sh: continuing without them; their tests will be SKIPPED (not in CI)"
fi

step "starting real REAPI servers and S3-compatible servers"
trap 'scripts/reapi-servers.sh stop; scripts/s3-servers.sh stop' EXIT
scripts/reapi-servers.sh start
eval "$(scripts/reapi-servers.sh env)"
scripts/s3-servers.sh start
eval "$(scripts/s3-servers.sh env)"

step "cargo test --workspace"
cargo test --workspace --locked "$@"
