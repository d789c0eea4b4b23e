#!/usr/bin/env bash
# Builds release binaries, starts a poseidon server on the local backend (as root, 127.0.0.1, port 0,
# its own temporary state directory and cgroup parent), runs every poseidon-loadgen scenario against it,
# prints the table, writes target/bench/results.json (and results.md, machine.txt), stops the server.
#
# Extra arguments go to poseidon-loadgen, e.g.
#   scripts/bench.sh --plugin-url http://127.0.0.1:PORT --plugin-file F --plugin-source S
#   scripts/bench.sh --nomad-url http://127.0.0.1:PORT
#   scripts/bench.sh --concurrency 1,8 --execute-count 50 --idle-runners 200   # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bench.sh: must run as root (the local backend mounts a tmpfs and creates cgroups per runner)" >&2
  exit 1
fi
need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v setsid >/dev/null 2>&1 || need_apt+=(util-linux)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

cargo build --release -p poseidon --bin poseidon -p poseidon-loadgen --bin poseidon-loadgen

out=target/bench
mkdir -p "$out"
state=$(mktemp -d /tmp/poseidon-bench.XXXXXX)
# Runner uids must be able to traverse to their runner directories (mktemp makes it 0700).
chmod 755 "$state"
cgroup="poseidon-bench-$$"
token="bench-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
cat >"$state/configuration.yaml" <<EOF
server:
  address: 127.0.0.1
  port: 0
  token: $token
logger:
  level: ${POSEIDON_BENCH_LOG_LEVEL:-info}
local:
  statedir: $state/state
  cgroupparent: $cgroup
  uidbase: 4000000
  uidcount: 20000
EOF

server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  # Whatever a killed server left: mounts, then files, then cgroups.
  if [ -d "$state/state/runners" ]; then
    for dir in "$state"/state/runners/*; do
      [ -e "$dir" ] && umount -l "$dir" 2>/dev/null || true
    done
  fi
  cp "$state/server.log" "$out/server.log" 2>/dev/null || true
  rm -rf "$state"
  for controller in memory pids cpu; do
    parent="/sys/fs/cgroup/$controller/$cgroup"
    [ -d "$parent" ] || continue
    find "$parent" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rmdir "$parent" 2>/dev/null || true
  done
}
trap cleanup EXIT

./target/release/poseidon --config "$state/configuration.yaml" >"$state/stdout" 2>"$state/server.log" &
server_pid=$!
url=""
for _ in $(seq 1 300); do
  line=$(grep -m1 '^poseidon listening on http://' "$state/stdout" 2>/dev/null || true)
  if [ -n "$line" ]; then
    url="${line##* }"
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "bench.sh: the server stopped at start:" >&2
    cat "$state/server.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "bench.sh: the server did not start within 30 s" >&2
  exit 1
fi
echo "server $url (pid $server_pid)"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "bwrap: $(bwrap --version 2>/dev/null || echo unknown)"
  echo "python3: $(/usr/bin/python3 --version 2>&1)"
  echo "free -h:"
  free -h
} | tee "$out/machine.txt"

./target/release/poseidon-loadgen --url "$url" --token "$token" --server-pid "$server_pid" \
  --json "$out/results.json" "$@" | tee "$out/results.md"
echo "results: $out/results.json, $out/results.md, $out/machine.txt"
