#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs every test of the project.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v setsid >/dev/null 2>&1 || need_apt+=(util-linux)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
command -v pasta >/dev/null 2>&1 || need_apt+=(passt)
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
# pasta (runners' user-mode network) opens /dev/net/tun as the runner's uid; standard distributions
# leave it 0666, some containers 0600.
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  echo "making /dev/net/tun usable by unprivileged users (mode 0666, as on standard distributions)"
  chmod 0666 /dev/net/tun
fi
if [ -x plugins/build.sh ]; then
  plugins/build.sh
fi
# The integration tests start real servers and sandboxes; two at a time suit a 2-core machine.
if [ -z "${NOMAD_ADDR:-}" ]; then
  echo "NOTE: NOMAD_ADDR is not set: the Nomad backend's tests run against the project's Nomad emulator only; their real-Nomad variants (tests named real_nomad*) are reported as ignored."
else
  echo "NOTE: NOMAD_ADDR=$NOMAD_ADDR: the Nomad backend's tests also run against this real Nomad (tests named real_nomad*)."
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
status=0
# The plugin authors' crate must stay publishable (its WIT is inside the package: wit/ links).
cargo package -p poseidon-plugin-api --allow-dirty --quiet || status=$?
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-4}" || status=$?
if [ -n "${NOMAD_ADDR:-}" ]; then
  # Each real test has its own Nomad namespace; two at a time keep a one-node dev agent responsive.
  cargo test --workspace --no-fail-fast -- --ignored real_nomad --test-threads="${REAL_NOMAD_TEST_THREADS:-2}" || status=$?
fi
# The local backend's tests once more on a cgroup v2 host (users' hosts are; this machine is v1).
if [ "${POSEIDON_SKIP_CGROUP2_VM:-0}" = 1 ]; then
  echo "skipped: cgroup v2 VM tests (POSEIDON_SKIP_CGROUP2_VM=1)"
else
  tests/cgroup2/run.sh || status=$?
fi
# The Debian package installed into a Debian 12 VM with systemd as PID 1 and started by its units.
if [ "${POSEIDON_SKIP_PACKAGE_VM:-0}" = 1 ]; then
  echo "skipped: Debian package in a systemd VM (POSEIDON_SKIP_PACKAGE_VM=1)"
else
  packaging/test-package-vm.sh || status=$?
fi
exit "$status"
