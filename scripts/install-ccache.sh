#!/usr/bin/env bash
# Installs ccache (Debian's, 4.7.x) once, for the ccache-against-`recache serve --http-listen`
# scenario (crates/cli/tests/ccache.rs). Later runs find it and do nothing. Needs root (CI is).
set -euo pipefail
if command -v ccache >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-ccache: ccache is not installed and installing it needs root (apt-get install ccache)" >&2
  exit 1
fi
echo "install-ccache: installing Debian's ccache"
export DEBIAN_FRONTEND=noninteractive
# The package lists are usually fresh (install-bazel.sh updated them in this run).
apt-get install -y -qq --no-install-recommends ccache >/dev/null 2>&1 ||
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends ccache >/dev/null; }
command -v ccache >/dev/null || { echo "install-ccache: ccache did not install" >&2; exit 1; }
echo "install-ccache: $(ccache --version | head -1)"
