#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs every test of the project.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v setsid >/dev/null 2>&1 || need_apt+=(util-linux)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# tests/systemd.rs: socket activation through systemd's own tool.
command -v systemd-socket-activate >/dev/null 2>&1 || need_apt+=(systemd)
# tests/influxdb.rs: Poseidon's measurements written to a real InfluxDB (v1 API), started by the test.
command -v influxd >/dev/null 2>&1 || need_apt+=(influxdb)
# tests/status_page.rs: the status page rendered by headless Chromium.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"; else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi
if [ -x plugins/build.sh ]; then
  plugins/build.sh
fi
# The integration tests start real servers and sandboxes; two at a time suit a 2-core machine.
if [ -z "${NOMAD_ADDR:-}" ]; then
  echo "NOTE: NOMAD_ADDR is not set: the API tests of the Nomad backend run against the project's Nomad emulator only; their real-Nomad variants (tests real_nomad::*) are skipped."
else
  echo "NOTE: NOMAD_ADDR=$NOMAD_ADDR: the API tests of the Nomad backend also run against this real Nomad."
fi
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"
