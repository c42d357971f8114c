#!/usr/bin/env bash
# Installs Prometheus (Debian's) once, for the metrics test (crates/cli/tests/metrics.rs): a
# real Prometheus scrapes `recache serve`'s /metrics and the test queries its HTTP API. The
# distribution's service is never started (policy-rc.d); the test runs its own instance on
# 127.0.0.1. Later runs find it and do nothing. Needs root (CI is).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-prometheus: Prometheus is not installed and installing it needs root (apt-get install prometheus)" >&2
  exit 1
fi
echo "install-prometheus: installing Debian's prometheus"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
command -v prometheus >/dev/null || { echo "install-prometheus: prometheus did not install" >&2; exit 1; }
echo "install-prometheus: $(prometheus --version 2>&1 | head -1)"
