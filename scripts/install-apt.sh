#!/usr/bin/env bash
# Installs Debian packages a test scenario needs, once: `scripts/install-apt.sh ccache prometheus`.
# Each argument is a command; its package has the same name. A command already on PATH is left
# as it is (later runs do nothing). Distribution services are never started (the machine's
# policy-rc.d); tests run their own instances on 127.0.0.1. Needs root to install (CI is).
#   ccache      ccache-against-`recache serve --http-listen` (crates/cli/tests/ccache.rs)
#   prometheus  scrapes `recache serve`'s /metrics (crates/cli/tests/metrics.rs)
#   chromium    loads the status page headless (crates/cli/tests/status_page.rs)
#   nginx       the HTTP benchmark's peer (scripts/nginx.sh; not a test)
set -euo pipefail
missing=()
for cmd in "$@"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-apt: ${missing[*]} not installed, and installing needs root (apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "install-apt: installing Debian's ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The package lists are usually fresh (install-bazel.sh updated them in this run).
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
for cmd in "${missing[@]}"; do
  command -v "$cmd" >/dev/null || { echo "install-apt: $cmd did not install" >&2; exit 1; }
done
