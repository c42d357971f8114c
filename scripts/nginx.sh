#!/usr/bin/env bash
# Installs, starts and stops nginx (Debian's) as the HTTP peer of perf-report's `http` section
# (issue 24): it serves and stores the same files as `recache serve --http-listen`, with
# `dav_methods PUT`, on 127.0.0.1 only.
#
# Usage: scripts/nginx.sh install|start|stop|env
#   install  apt-get install nginx once (needs root); the distribution's service is never
#            started (policy-rc.d) and its default site is not used
#   start    install if needed, start nginx on a free 127.0.0.1 port with its own config, pid,
#            logs and document root under .reapi/nginx-run, wait until it answers
#   stop     stop what this script started (by its PID file), remove .reapi/nginx-run
#   env      print export RECACHE_TEST_NGINX=http://127.0.0.1:PORT (`eval "$(scripts/nginx.sh env)"`)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$ROOT/.reapi/nginx-run"

say() { echo "nginx: $*" >&2; }
die() { say "error: $*"; exit 1; }

install() {
  "$ROOT/scripts/install-apt.sh" nginx || die "nginx is not installed"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
  install
  stop_quietly
  mkdir -p "$RUN/root/cas" "$RUN/tmp" "$RUN/logs"
  local port
  port="$(free_port)"
  cat >"$RUN/nginx.conf" <<CONF
user root root;
worker_processes auto;
pid $RUN/nginx.pid;
error_log $RUN/logs/error.log warn;
daemon on;
events { worker_connections 2048; }
http {
  access_log off;
  client_body_temp_path $RUN/tmp/body;
  proxy_temp_path $RUN/tmp/proxy;
  fastcgi_temp_path $RUN/tmp/fastcgi;
  uwsgi_temp_path $RUN/tmp/uwsgi;
  scgi_temp_path $RUN/tmp/scgi;
  client_max_body_size 0;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$port;
    root $RUN/root;
    location / {
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }
  }
}
CONF
  nginx -c "$RUN/nginx.conf" -p "$RUN" || die "nginx did not start (see $RUN/logs/error.log)"
  echo "export RECACHE_TEST_NGINX=http://127.0.0.1:$port" >"$RUN/env.sh"
  local i
  for i in $(seq 1 50); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/cas/', timeout=1)" 2>/dev/null ||
      python3 -c "import urllib.request,urllib.error,sys
try: urllib.request.urlopen('http://127.0.0.1:$port/none', timeout=1)
except urllib.error.HTTPError: sys.exit(0)
sys.exit(1)" 2>/dev/null; then
      say "started on http://127.0.0.1:$port"
      return 0
    fi
    sleep 0.1
  done
  die "nginx does not answer on 127.0.0.1:$port"
}

stop_quietly() {
  if [ -f "$RUN/nginx.pid" ]; then
    local pid
    pid="$(cat "$RUN/nginx.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -rf "$RUN"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_quietly; say "stopped" ;;
  env) [ -f "$RUN/env.sh" ] && cat "$RUN/env.sh" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
