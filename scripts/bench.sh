#!/usr/bin/env bash
# One command for the load benchmarks. Builds release binaries; starts a poseidon server on the local
# backend (as root, 127.0.0.1, port 0, its own temporary state directory and cgroup parent) and, for
# the `nomad` scenario, the Nomad emulator plus a second poseidon server on the Nomad backend over it;
# runs every poseidon-loadgen scenario; prints the table; writes target/bench/results.json (and
# results.md, machine.txt, the servers' logs); stops everything it started.
#
# For the `plugins` and `reload` scenarios it builds the example plugins (plugins/build.sh) and starts
# a third poseidon server whose plugin directory holds jwt_auth.wasm (authenticator, one tenant
# "bench" with a random HS256 key and the load generator's environments) and submission_guard.wasm
# (preprocessor with a few limits); the load generator signs its own bearer token with that key.
# `reload` copies two builds of jwt_auth.wasm (the second with an extra custom section, so its
# content differs) over the watched file in turn, every second.
#
# Extra arguments go to poseidon-loadgen, e.g.
#   scripts/bench.sh --plugin-url http://127.0.0.1:PORT --plugin-file F --plugin-source S
#   scripts/bench.sh --concurrency 1,8 --execute-count 50 --idle-runners 200   # a shorter run
# BENCH_NOMAD=0 skips starting the emulator (the nomad scenario then says it is skipped, unless
# --nomad-url is given). BENCH_PLUGINS=0 skips building the plugins and starting their server (the
# plugins and reload scenarios then say they are skipped, unless --plugin-url is given). POSEIDON_BENCH_LOG_LEVEL sets the servers' log level (default info).
# BENCH_PLUGIN_LIMITS='{ inlineCalls: false, keepResidentKb: 0 }' sets the plugin server's `limits:`
# (e.g. to compare the plugin host's call paths with one binary).
# BENCH_PLUGINS_AA=1 starts the plugin server without plugins (A/A: the bias of the comparison itself).
# BENCH_AUTH_CACHE=MS gives the plugin server's jwt_auth entry `cacheDecisions: { inputs: [authorization], ttlMs: MS }`.
# POSEIDON_BENCH_SERVER=PATH runs that poseidon binary instead of the fresh release build (to compare
# two builds with the same load generator; the agent next to it is used). BENCH_OUT=DIR writes the
# results there instead. BENCH_BUILD=0 skips the release build (the binaries must exist; for
# alternating A/B runs of two prebuilt servers).
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
command -v pasta >/dev/null 2>&1 || need_apt+=(passt)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

start_nomad=${BENCH_NOMAD:-1}
start_plugins=${BENCH_PLUGINS:-1}
env_base=9100
prev=
for arg in "$@"; do
  [ "$arg" = "--nomad-url" ] && start_nomad=0
  [ "$arg" = "--plugin-url" ] && start_plugins=0
  [ "$prev" = "--env-base" ] && env_base=$arg
  case "$arg" in --env-base=*) env_base=${arg#*=} ;; esac
  prev=$arg
done

if [ "${BENCH_BUILD:-1}" = 1 ]; then
  cargo build --release -p poseidon --bin poseidon -p poseidon-loadgen --bin poseidon-loadgen \
    -p nomad-emulator --bin nomad-emulator -p poseidon-agent --bin poseidon-agent
fi
if [ "$start_plugins" = 1 ]; then
  plugins/build.sh -p jwt-auth -p submission-guard >/dev/null
fi
wasm_dir=plugins/target/wasm32-wasip2/release

server_bin=${POSEIDON_BENCH_SERVER:-./target/release/poseidon}
out=${BENCH_OUT:-target/bench}
mkdir -p "$out"
work=$(mktemp -d /tmp/poseidon-bench.XXXXXX)
# Runner uids must be able to traverse to their runner directories (mktemp makes it 0700).
chmod 755 "$work"
token="bench-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
log_level=${POSEIDON_BENCH_LOG_LEVEL:-info}

pids=()
cgroups=()

stop() { # pid: SIGTERM, up to 30 s, then SIGKILL
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local i
  # Servers first (newest first), then the emulator they use.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    stop "${pids[$i]}"
  done
  # Whatever a killed server left: mounts, then files, then cgroups.
  for dir in "$work"/*/state/runners/*; do
    [ -e "$dir" ] && umount -l "$dir" 2>/dev/null || true
  done
  for name in local nomad emulator plugins; do
    cp "$work/$name/server.log" "$out/$name.log" 2>/dev/null || true
  done
  rm -rf "$work"
  # Runners outlive their server by design: a sandbox whose start was still in flight when the
  # load generator deleted its environment survives the server. Everything in this run's cgroups
  # is this run's: end it, so that the groups can go.
  for cgroup in "${cgroups[@]}"; do
    for procs in /sys/fs/cgroup/memory/"$cgroup"/*/cgroup.procs /sys/fs/cgroup/"$cgroup"/*/cgroup.procs; do
      [ -f "$procs" ] || continue
      while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$procs"
    done
  done
  sleep 0.2
  for cgroup in "${cgroups[@]}"; do
    for controller in memory pids cpu .; do # "." : cgroup v2
      parent="/sys/fs/cgroup/$controller/$cgroup"
      [ -d "$parent" ] || continue
      find "$parent" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
      rmdir "$parent" 2>/dev/null || true
    done
  done
}
trap cleanup EXIT

# wait_line FILE PATTERN PID: prints the first line of FILE matching PATTERN, within 30 s.
wait_line() {
  local line
  for _ in $(seq 1 300); do
    line=$(grep -m1 -E "$2" "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then
      echo "$line"
      return 0
    fi
    if ! kill -0 "$3" 2>/dev/null; then
      echo "bench.sh: $1's process stopped at start" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "bench.sh: no line matching '$2' in $1 within 30 s" >&2
  return 1
}

# start_server NAME UIDBASE [EXTRA_YAML]: sets server_url and server_pid.
start_server() {
  local name=$1 dir="$work/$1" cgroup="poseidon-bench-$$-$1"
  mkdir -p "$dir"
  chmod 755 "$dir"
  cgroups+=("$cgroup")
  cat >"$dir/configuration.yaml" <<EOF
server:
  address: 127.0.0.1
  port: 0
  token: $token
logger:
  level: $log_level
local:
  statedir: $dir/state
  cgroupparent: $cgroup
  uidbase: $2
  uidcount: 20000
${3:-}
EOF
  "$server_bin" --config "$dir/configuration.yaml" >"$dir/stdout" 2>"$dir/server.log" &
  server_pid=$!
  pids+=("$server_pid")
  local line
  if ! line=$(wait_line "$dir/stdout" '^poseidon listening on http://' "$server_pid"); then
    cat "$dir/server.log" >&2
    exit 1
  fi
  server_url="${line##* }"
  echo "$name server: $server_url (pid $server_pid)"
}

start_server local 4000000
local_url=$server_url
local_pid=$server_pid

nomad_args=()
if [ "$start_nomad" = 1 ]; then
  mkdir -p "$work/emulator"
  ./target/release/nomad-emulator --bind 127.0.0.1:0 --data-dir "$work/emulator/data" \
    >"$work/emulator/stdout" 2>"$work/emulator/server.log" &
  emulator_pid=$!
  pids+=("$emulator_pid")
  emulator_addr=$(wait_line "$work/emulator/stdout" '^127\.0\.0\.1:[0-9]+$' "$emulator_pid")
  echo "nomad emulator: $emulator_addr (pid $emulator_pid)"
  start_server nomad 4100000 "nomad:
  enabled: true
  address: 127.0.0.1
  port: ${emulator_addr##*:}
  unprivilegedprefix: \"\""
  nomad_args=(--nomad-url "$server_url")
fi

plugin_args=()
if [ "$start_plugins" = 1 ]; then
  plugin_dir="$work/plugins/plugins"
  mkdir -p "$plugin_dir"
  cp "$wasm_dir/jwt_auth.wasm" "$wasm_dir/submission_guard.wasm" "$plugin_dir/"
  # The second build for `reload`: the same component plus a custom section (id 0, 7 bytes: name
  # "bench", payload "b"), so its digest differs and every swap is a real recompile and swap.
  cp "$wasm_dir/jwt_auth.wasm" "$work/plugins/jwt_auth-a.wasm"
  cp "$wasm_dir/jwt_auth.wasm" "$work/plugins/jwt_auth-b.wasm"
  printf '\x00\x07\x05benchb' >>"$work/plugins/jwt_auth-b.wasm"
  jwt_key="bench-key-$(od -An -N16 -tx8 /dev/urandom | tr -d ' ')"
  environments=$(seq -s, $((env_base + 1)) $((env_base + 6)))
  plugins_yaml="plugins:
  directory: $plugin_dir
  entries:
    - file: jwt_auth.wasm
      kind: authenticator${BENCH_AUTH_CACHE:+
      cacheDecisions: { inputs: [authorization], ttlMs: $BENCH_AUTH_CACHE \}}
      config: { key.bench: \"$jwt_key\", environments.bench: \"$environments\" }
    - file: submission_guard.wasm
      failOpen: false
      config: { maxFiles: 50, maxFileBytes: 1048576, maxTotalBytes: 4194304, forbiddenPaths: \"**/*.so\", maxTimeLimit: 60, denyPrivileged: true }${BENCH_PLUGIN_LIMITS:+
  limits: $BENCH_PLUGIN_LIMITS}"
  # BENCH_PLUGINS_AA=1: the "plugin" server has no plugins (an A/A run that shows what the order
  # of the two servers alone makes of the comparison).
  [ "${BENCH_PLUGINS_AA:-0}" = 1 ] && plugins_yaml=""
  start_server plugins 4200000 "$plugins_yaml"
  plugins_url=$server_url
  plugin_args=(--plugin-url "$plugins_url" --plugin-jwt-key "$jwt_key"
    --plugin-file "$plugin_dir/jwt_auth.wasm"
    --plugin-source "$work/plugins/jwt_auth-b.wasm,$work/plugins/jwt_auth-a.wasm")
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "server binary: $server_bin"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "bwrap: $(bwrap --version 2>/dev/null || echo unknown)"
  echo "python3: $(/usr/bin/python3 --version 2>&1)"
  echo "free -h:"
  free -h
} | tee "$out/machine.txt"

./target/release/poseidon-loadgen --url "$local_url" --token "$token" --server-pid "$local_pid" \
  "${nomad_args[@]}" "${plugin_args[@]}" --json "$out/results.json" "$@" | tee "$out/results.md"
if [ "$start_plugins" = 1 ]; then
  # The plugin host's view after the run, and how often it loaded the watched file.
  curl -s -H "Poseidon-Token: $token" "$plugins_url/api/v1/plugins" >"$out/plugins.json" || true
  echo "plugin loads logged by the plugin server: $(grep -c 'plugin loaded' "$work/plugins/server.log" || true)" \
    | tee -a "$out/results.md"
  # What a plugin call took inside the server (its own histogram): the mean per plugin; and
  # what each route took inside both servers, to tell the calls from the rest.
  curl -s -H "Poseidon-Token: $token" "$plugins_url/metrics" >"$out/plugins-metrics.txt" || true
  curl -s -H "Poseidon-Token: $token" "$local_url/metrics" >"$out/local-metrics.txt" || true
  for server in local plugins; do
    awk -v server="$server" '/^poseidon_http_request_duration_seconds_(sum|count)/ {
           match($0, /route="[^"]*",method="[^"]*"/); r = substr($0, RSTART, RLENGTH)
           if ($1 ~ /_sum/) sum[r] = $2; else count[r] = $2 }
         END { for (r in count) if (count[r] >= 100)
           printf "requests in the %s server: %s %d, mean %.3f ms\n", server, r, count[r], sum[r] / count[r] * 1e3 }' \
      "$out/$server-metrics.txt" | sort | tee -a "$out/results.md"
  done
  # p50 interpolated within the histogram's bucket.
  awk '/^poseidon_plugin_call_duration_seconds_(sum|count|bucket)/ {
         match($0, /plugin="[^"]*"/); p = substr($0, RSTART + 8, RLENGTH - 9)
         if ($1 ~ /_sum/) sum[p] = $2
         else if ($1 ~ /_count/) count[p] = $2
         else if ($1 !~ /Inf/) { match($0, /le="[^"]*"/); n[p]++; le[p, n[p]] = substr($0, RSTART + 4, RLENGTH - 5); cum[p, n[p]] = $2 } }
       END { for (p in count) if (count[p] > 0) {
         half = count[p] / 2; lo = 0; below = 0; p50 = "";
         for (i = 1; i <= n[p]; i++) { if (cum[p, i] >= half) { p50 = lo + (le[p, i] - lo) * (half - below) / (cum[p, i] - below); break } lo = le[p, i]; below = cum[p, i] }
         printf "plugin calls in the server: %s %d calls, mean %.1f µs, p50 ~%.0f µs\n", p, count[p], sum[p] / count[p] * 1e6, p50 * 1e6 } }' \
    "$out/plugins-metrics.txt" | tee -a "$out/results.md"
fi
echo "results: $out/results.json, $out/results.md, $out/machine.txt"
