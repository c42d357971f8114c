#!/usr/bin/env bash
# What one remote-cache hit costs per command, recache's CLI against Bazel 2.1.0, on the same
# REAPI server and parallelism:
#
# - recache: N distinct commands, one `recache run` process each (two at a time, xargs -P 2),
#   each writing a 4 KiB output; populated once, then measured on an empty local store (so every
#   output comes from the server), as a fresh CI machine would.
# - Bazel 2.1.0 (from the npm registry, installed once into .reapi/bazel-2.1.0): N genrules with
#   the same outputs, `--jobs=2`, populated once, then `bazel clean` and built again against the
#   warm Bazel server (every action a remote cache hit).
#
# Each side is timed for N and for N/10 commands; the cost "at the margin" is
# (T(N) - T(N/10)) / (N - N/10), which leaves out fixed costs (Bazel's startup and analysis of an
# empty build, the first connection). Medians of --reps repetitions. Prints one JSON object.
#
#   scripts/reapi-servers.sh start && eval "$(scripts/reapi-servers.sh env)"
#   cargo build --release -p recache
#   scripts/cli-vs-bazel.sh [--n 200] [--reps 3] [--remote grpc://…] [--instance NAME]
#
# The server defaults to BuildGrid ($RECACHE_TEST_BUILDGRID, instance
# $RECACHE_TEST_BUILDGRID_INSTANCE), as in the issue's measurement; the recache binary to
# $RECACHE_BIN or target/release/recache.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
n=200
reps=3
remote="${RECACHE_TEST_BUILDGRID:-}"
instance="${RECACHE_TEST_BUILDGRID_INSTANCE:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --n) n="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --remote) remote="$2"; shift 2 ;;
    --instance) instance="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "cli-vs-bazel: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$remote" ] || { echo "cli-vs-bazel: no server: pass --remote or eval \"\$(scripts/reapi-servers.sh env)\"" >&2; exit 2; }
[ "$n" -ge 20 ] || { echo "cli-vs-bazel: --n must be at least 20" >&2; exit 2; }
small=$((n / 10))
recache="${RECACHE_BIN:-$root/target/release/recache}"
[ -x "$recache" ] || { echo "cli-vs-bazel: $recache not found: cargo build --release -p recache" >&2; exit 2; }

# Bazel 2.1.0, once, into the ignored tools folder.
tools="$root/.reapi/bazel-2.1.0"
bazel="$tools/node_modules/@bazel/bazel-linux_x64/bazel-2.1.0-linux-x86_64"
if [ ! -x "$bazel" ]; then
  echo "cli-vs-bazel: installing Bazel 2.1.0 from the npm registry into $tools" >&2
  mkdir -p "$tools"
  npm install --no-audit --no-fund --silent --prefix "$tools" @bazel/bazel-linux_x64@2.1.0 >&2
  chmod +x "$bazel"
fi

work="$(mktemp -d)"
bazel_root="$work/bazel-root"
cleanup() {
  (cd "$work/bzl" 2>/dev/null && "$bazel" --output_user_root="$bazel_root" shutdown >/dev/null 2>&1) || true
  rm -rf "$work"
}
trap cleanup EXIT
ns="cli-vs-bazel-$(date +%s%N)"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# --- recache -----------------------------------------------------------------------------
mkdir -p "$work/ws"
echo "$ns" > "$work/ws/in.txt"
# One line per command: its index. Each writes o<i>.txt (4 KiB + its index).
recache_pass() { # $1: how many, $2: cache dir
  seq 0 $(($1 - 1)) | (cd "$work/ws" && RECACHE_CACHE_DIR="$2" xargs -P 2 -I{} \
    "$recache" run --remote "$remote" --instance-name "$instance" --input in.txt \
      --output o{}.txt -- sh -c "head -c 4096 /dev/zero | tr '\\0' x > o{}.txt; echo $ns-{} >> o{}.txt" \
    2>>"$work/recache.log")
}
recache_pass "$n" "$work/populate" # misses, written to the server
hits_before=$(grep -c '' "$work/recache.log" || true)
r_small=(); r_all=()
for rep in $(seq "$reps"); do
  rm -f "$work"/ws/o*.txt
  t=$(now_ms); recache_pass "$small" "$work/c-small-$rep"; r_small+=($(( $(now_ms) - t )))
  rm -f "$work"/ws/o*.txt
  t=$(now_ms); recache_pass "$n" "$work/c-all-$rep"; r_all+=($(( $(now_ms) - t )))
done
# Every measured run must have been a hit.
not_hits=$(tail -n +"$((hits_before + 1))" "$work/recache.log" | grep -vc '^recache: hit' || true)

# --- Bazel 2.1.0 -------------------------------------------------------------------------
mkdir -p "$work/bzl"
touch "$work/bzl/WORKSPACE"
{
  for i in $(seq 0 $((n - 1))); do
    echo "genrule(name = \"g$i\", outs = [\"o$i.txt\"], cmd = \"head -c 4096 /dev/zero | tr '\\\\0' x > \$@; echo $ns-$i >> \$@\")"
  done
  printf 'filegroup(name = "small", srcs = [%s])\n' "$(seq 0 $((small - 1)) | sed 's/.*/":g&"/' | paste -sd,)"
  printf 'filegroup(name = "all", srcs = [%s])\n' "$(seq 0 $((n - 1)) | sed 's/.*/":g&"/' | paste -sd,)"
} > "$work/bzl/BUILD"
bz() { (cd "$work/bzl" && "$bazel" --output_user_root="$bazel_root" "$@" >>"$work/bazel.log" 2>&1); }
bazel_flags=(--remote_cache="$remote" --remote_instance_name="$instance" --jobs=2)
bz build "${bazel_flags[@]}" //:all # populate
b_small=(); b_all=()
for rep in $(seq "$reps"); do
  bz clean
  t=$(now_ms); bz build "${bazel_flags[@]}" //:small; b_small+=($(( $(now_ms) - t )))
  bz clean
  t=$(now_ms); bz build "${bazel_flags[@]}" //:all; b_all+=($(( $(now_ms) - t )))
done
# The last build's summary: every action a remote cache hit.
bazel_summary=$(grep -E '[0-9]+ processes?:' "$work/bazel.log" | tail -1 || true)

rs=$(echo "${r_small[@]}" | median); ra=$(echo "${r_all[@]}" | median)
bs=$(echo "${b_small[@]}" | median); ba=$(echo "${b_all[@]}" | median)
python3 - "$n" "$small" "$rs" "$ra" "$bs" "$ba" "$not_hits" "$bazel_summary" "$remote" <<'EOF'
import json, sys
n, small, rs, ra, bs, ba = (int(x) for x in sys.argv[1:7])
not_hits, summary, remote = int(sys.argv[7]), sys.argv[8], sys.argv[9]
r = (ra - rs) / (n - small)
b = (ba - bs) / (n - small)
print(json.dumps({
    "remote": remote, "commands": n, "small": small,
    "recache_ms": {"small": rs, "all": ra}, "bazel_ms": {"small": bs, "all": ba},
    "recache_ms_per_command": round(r, 2), "bazel_ms_per_genrule": round(b, 2),
    "ratio": round(r / b, 2) if b > 0 else None,
    "recache_runs_not_hits": not_hits, "bazel_last_summary": summary.strip(),
}))
EOF
