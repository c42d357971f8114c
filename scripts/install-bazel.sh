#!/usr/bin/env bash
# Installs Bazel 4.2.3 (Debian's `bazel-bootstrap`) once, for the Bazel-against-`recache serve`
# scenario (crates/cli/tests/bazel.rs). Later runs find it and do nothing. Needs root (CI is).
set -euo pipefail
# Debian's build reports `bazel no_version`: ask the package manager instead.
installed() {
  command -v bazel >/dev/null 2>&1 &&
    dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null | grep -q '^4\.2\.3'
}
if installed; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-bazel: Bazel 4.2.3 is not installed and installing it needs root (apt-get install bazel-bootstrap)" >&2
  exit 1
fi
echo "install-bazel: installing Debian's bazel-bootstrap (Bazel 4.2.3)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends bazel-bootstrap >/dev/null
installed || { echo "install-bazel: bazel-bootstrap 4.2.3 did not install" >&2; exit 1; }
echo "install-bazel: $(dpkg-query -W -f='bazel-bootstrap ${Version}' bazel-bootstrap)"
