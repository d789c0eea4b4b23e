#!/usr/bin/env bash
# Checks the Debian package the way an installation uses it: the control data (dependencies,
# conffile, maintainer scripts), the files (binary, units, default configuration), and the
# packaged binary started with the packaged configuration and the unit's environment through
# systemd-socket-activate on a free loopback port, answering /health and /version.
#
#   packaging/test-package.sh [DEB]
#
# Without DEB it runs `cargo deb -p poseidon --no-build` (needs `cargo install cargo-deb` and a
# release build: `cargo build --release -p poseidon`). The package is extracted into a temporary
# root (dpkg-deb -x), not installed into this machine; everything it starts it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-}
work=$(mktemp -d /tmp/poseidon-package.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  for c in memory pids cpu; do rmdir "/sys/fs/cgroup/$c/poseidon-package-$$" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }

if [ -z "$deb" ]; then
  cargo deb -p poseidon --no-build --output "$work/" >/dev/null
  deb=$(ls "$work"/poseidon_*.deb)
fi
info=$(dpkg-deb -f "$deb")
grep -q '^Depends:.*bubblewrap' <<<"$info" || fail "Depends lacks bubblewrap"
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = /etc/poseidon/configuration.yaml ] \
  || fail "the configuration is not a conffile"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst | grep -q 'deb-systemd-helper enable poseidon.socket' \
  || fail "postinst does not enable poseidon.socket"
root=$work/root
dpkg-deb -x "$deb" "$root"
for f in usr/bin/poseidon usr/bin/poseidon-agent usr/lib/systemd/system/poseidon.service usr/lib/systemd/system/poseidon.socket \
  etc/poseidon/configuration.yaml usr/share/doc/poseidon/operations.md; do
  [ -e "$root/$f" ] || fail "$f is not in the package"
done
"$root/usr/bin/poseidon" --version
"$root/usr/bin/poseidon" config check "$root/etc/poseidon/configuration.yaml"

# Start it as poseidon.service would: the unit's Environment= lines, its ExecStart's
# configuration (from the package), the socket passed by systemd.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
env_args=()
while IFS= read -r line; do env_args+=(-E "${line#Environment=}"); done \
  < <(grep '^Environment=' "$root/usr/lib/systemd/system/poseidon.service")
mkdir -p "$work/state"
systemd-socket-activate -l "127.0.0.1:$port" "${env_args[@]}" \
  -E POSEIDON_LOCAL_STATEDIR="$work/state" -E POSEIDON_LOCAL_CGROUPPARENT="poseidon-package-$$" \
  -E POSEIDON_LOCAL_UIDBASE=4600000 \
  "$root/usr/bin/poseidon" --config "$root/etc/poseidon/configuration.yaml" \
  >"$work/stdout" 2>"$work/stderr" &
pid=$!
version=
for _ in $(seq 1 300); do
  version=$(curl -sf "http://127.0.0.1:$port/api/v1/version" || true)
  [ -n "$version" ] && break
  sleep 0.1
done
[ "$version" = "\"$("$root/usr/bin/poseidon" --version | cut -d' ' -f2)\"" ] \
  || fail "no /version answer: $version; $(cat "$work/stderr")"
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api/v1/health")
[ "$status" = 204 ] || fail "/health answered $status"
grep -q "listening on http://127.0.0.1:$port" "$work/stdout" || fail "not serving the passed socket"
echo "test-package: OK ($deb)"
