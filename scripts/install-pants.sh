#!/usr/bin/env bash
# Installs Pants 2.17.1 once into .reapi/pants (git-ignored), for the Pants-against-`recache
# serve` scenario (crates/cli/tests/pants.rs). Later runs find it and do nothing.
# Pants 2.17 needs Python < 3.10: the script takes RECACHE_PANTS_PYTHON, else the newest 3.9
# (then 3.8) from pyenv, else python3.9 on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=.reapi/pants
PANTS_VERSION=2.17.1
installed="$("$DEST/bin/pip" show pantsbuild.pants 2>/dev/null || true)"
if [ -x "$DEST/bin/pants" ] && grep -qx "Version: $PANTS_VERSION" <<<"$installed"; then
  exit 0
fi
find_python() {
  if [ -n "${RECACHE_PANTS_PYTHON:-}" ]; then echo "$RECACHE_PANTS_PYTHON"; return; fi
  local root="${PYENV_ROOT:-$HOME/.pyenv}" minor candidate
  for minor in 3.9 3.8; do
    candidate="$(ls -d "$root"/versions/"$minor".* 2>/dev/null | sort -V | tail -1 || true)"
    if [ -n "$candidate" ] && [ -x "$candidate/bin/python3" ]; then echo "$candidate/bin/python3"; return; fi
  done
  command -v python3.9 || true
}
PY="$(find_python)"
if [ -z "$PY" ]; then
  echo "install-pants: no Python 3.8/3.9 found (Pants $PANTS_VERSION needs Python < 3.10): install one (pyenv install 3.9) or set RECACHE_PANTS_PYTHON" >&2
  exit 1
fi
echo "install-pants: installing pantsbuild.pants==$PANTS_VERSION with $PY into $DEST"
rm -rf "$DEST"
"$PY" -m venv "$DEST"
"$DEST/bin/pip" install -q "pantsbuild.pants==$PANTS_VERSION"
"$DEST/bin/pants" --version >/dev/null 2>&1 || true
[ -x "$DEST/bin/pants" ] || { echo "install-pants: no pants entry point after the install" >&2; exit 1; }
echo "install-pants: Pants $PANTS_VERSION ready at $DEST/bin/pants"
