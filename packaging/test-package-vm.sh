#!/usr/bin/env bash
# Installs the Debian package into a Debian 12 VM whose PID 1 is systemd, starts it with its own
# units (poseidon.socket, poseidon.service: Type=notify, watchdog, socket activation) and checks
# that it serves: /api/v1/health answers through the socket systemd holds, the service is active
# (READY=1 arrived), the watchdog keeps it alive, and an environment's pool fills (the packaged
# runner agent starts sandboxes on the VM's cgroup v2). Called by scripts/test.sh.
#
#   packaging/test-package-vm.sh [DEB]
#
# Without DEB it builds the package (cargo-deb, installed from crates.io when missing; a release
# build with the static runner agent). The VM is the cgroup v2 VM's kernel (shared/tools/cgroup2-vm)
# booting a copy of its Debian root with systemd added (apt, once, cached in
# $POSEIDON_DEB_VM_HOME, default ~/.cache/poseidon-deb-vm). Bounded: the VM is stopped after
# $POSEIDON_DEB_VM_TIMEOUT seconds (default 600). Says "skipped" (exit 0) when the VM cannot run
# here; fails when the package does not install, start or serve.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-}
tool=../shared/tools/cgroup2-vm/run.sh
vm_home=${CGROUP2_VM_HOME:-$HOME/.cache/cgroup2-vm}
H=${POSEIDON_DEB_VM_HOME:-$HOME/.cache/poseidon-deb-vm}
skip() { echo "skipped: Debian package in a systemd VM ($*)"; exit 0; }
[ -f "$tool" ] || skip "$tool is missing"
work=$(mktemp -d /tmp/poseidon-deb-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT

if [ -z "$deb" ]; then
  command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
  # The runner agent runs inside every sandbox: static (musl), as scripts/run.sh builds it.
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
  cargo build -q --release -p poseidon-agent --target x86_64-unknown-linux-musl
  cargo build -q --release -p poseidon
  target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  cp "$target/x86_64-unknown-linux-musl/release/poseidon-agent" "$target/release/poseidon-agent"
  mkdir -p "$work/deb"
  # (cargo-deb warns that it finds no shared-library dependencies of the static agent: right.)
  cargo deb -p poseidon --no-build --output "$work/deb/" 2>&1 >/dev/null | grep -v -e 'dependency specification' -e 'No \$auto deps' || true
  deb=$(ls "$work"/deb/poseidon_*.deb)
fi

# The kernel and the Debian root of the cgroup v2 VM (built by its first run).
if [ ! -f "$vm_home/vmlinuz" ]; then
  printf '#!/bin/sh\ntrue\n' >/tmp/poseidon-deb-vm-noop.sh
  bash "$tool" /tmp/poseidon-deb-vm-noop.sh >/dev/null 2>&1 || true
fi
[ -f "$vm_home/vmlinuz" ] && [ -d "$vm_home/root" ] || skip "the cgroup v2 VM could not be built here"
command -v qemu-system-x86_64 >/dev/null || skip "qemu is missing"
if [ ! -x "$H/root/lib/systemd/systemd" ]; then
  echo "[deb-vm] adding systemd to a copy of the VM's Debian root (apt, once)"
  rm -rf "$H/root.new" && mkdir -p "$H" && cp -a "$vm_home/root" "$H/root.new"
  mount -t proc proc "$H/root.new/proc"
  set +e
  DEBIAN_FRONTEND=noninteractive chroot "$H/root.new" sh -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd systemd-sysv dbus' >"$H/apt.log" 2>&1
  code=$?
  set -e
  umount "$H/root.new/proc"
  [ "$code" = 0 ] || skip "could not install systemd into the VM root: $(tail -n 3 "$H/apt.log")"
  rm -rf "$H/root" && mv "$H/root.new" "$H/root"
fi

cp -a "$H/root" "$work/root"
r=$work/root
cp "$deb" "$r/root/poseidon.deb"
# The check, run by a unit once the VM has booted; its lines go to the console.
cat >"$r/usr/local/bin/package-test" <<'EOS'
#!/bin/bash
say() { echo "PACKAGE-TEST: $*" >/dev/console; }
fail() { say "FAIL: $*"; journalctl -u poseidon.service -u poseidon.socket --no-pager | tail -n 40 >/dev/console; exit 1; }
http() { # METHOD PATH [BODY] -> prints "STATUS BODY"
  python3 - "$@" <<'EOP'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", 7200, timeout=10)
c.request(sys.argv[1], sys.argv[2], body=sys.argv[3] if len(sys.argv) > 3 else None)
r = c.getresponse(); print(r.status, r.read().decode())
EOP
}
say "PID 1 is $(cat /proc/1/comm), cgroup $(stat -fc %T /sys/fs/cgroup)"
dpkg -i /root/poseidon.deb >/tmp/dpkg.log 2>&1 || fail "dpkg -i: $(tail -n 5 /tmp/dpkg.log)"
say "installed: $(dpkg-query -W poseidon)"
systemctl is-enabled poseidon.socket >/dev/null || fail "poseidon.socket is not enabled by the package"
poseidon config check /etc/poseidon/configuration.yaml >/dev/null || fail "the packaged configuration does not check"
systemctl start poseidon.socket poseidon.service || fail "systemctl start"
[ "$(systemctl is-active poseidon.service)" = active ] || fail "poseidon.service is not active"
answer=$(http GET /api/v1/health) || fail "no answer on 127.0.0.1:7200"
[ "${answer%% *}" = 204 ] || fail "/health answered $answer"
say "health: $answer"
[ "$(systemctl show -p NRestarts --value poseidon.service)" = 0 ] || fail "the service restarted"
answer=$(http PUT /api/v1/execution-environments/1 '{"image":"host","prewarmingPoolSize":1,"cpuLimit":100,"memoryLimit":256,"networkAccess":false,"exposedPorts":[]}')
[ "${answer%% *}" = 201 ] || fail "PUT environment: $answer"
for _ in $(seq 1 120); do
  stats=$(http GET /api/v1/statistics/execution-environments)
  grep -q '"idleRunners":1' <<<"$stats" && break
  sleep 1
done
grep -q '"idleRunners":1' <<<"$stats" || fail "the pool did not fill: $stats"
say "pool: $stats"
# Several watchdog periods (WatchdogSec=5) later the service is the same process, still active.
pid=$(systemctl show -p MainPID --value poseidon.service)
sleep 12
[ "$(systemctl show -p MainPID --value poseidon.service)" = "$pid" ] || fail "the service was restarted (watchdog?)"
[ "$(systemctl show -p NRestarts --value poseidon.service)" = 0 ] || fail "the service restarted"
systemctl stop poseidon.service || fail "systemctl stop"
say "OK"
EOS
chmod +x "$r/usr/local/bin/package-test"
cat >"$r/etc/systemd/system/package-test.service" <<'EOS'
[Unit]
Description=Poseidon package test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/bin/package-test
ExecStopPost=/bin/systemctl poweroff --no-block
StandardOutput=journal+console
StandardError=journal+console
EOS
mkdir -p "$r/etc/systemd/system/default.target.wants"
ln -sf /etc/systemd/system/package-test.service "$r/etc/systemd/system/default.target.wants/package-test.service"
# No getty, no network waits: a quick boot.
ln -sf /dev/null "$r/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$r/etc/systemd/system/getty@tty1.service"
ln -sf /dev/null "$r/etc/systemd/system/systemd-networkd-wait-online.service"
echo poseidon-vm >"$r/etc/hostname"
size=$(( $(du -sm "$r" | cut -f1) + 1024 ))
truncate -s "${size}M" "$work/disk.ext4"
mkfs.ext4 -q -F -d "$r" "$work/disk.ext4"
rm -rf "$r"
echo "[deb-vm] booting Debian 12 with systemd (qemu, software emulation)"
timeout "${POSEIDON_DEB_VM_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 \
  -nographic -no-reboot -kernel "$vm_home/vmlinuz" -initrd "$vm_home/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.show_status=0 init=/lib/systemd/systemd" \
  -drive "file=$work/disk.ext4,if=virtio,format=raw" >"$work/console.log" 2>&1 || true
sed -e 's/\r$//' -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$work/console.log" | grep -E 'PACKAGE-TEST|poseidon' || true
if grep -q 'PACKAGE-TEST: OK' "$work/console.log"; then
  echo "test-package-vm: OK ($deb installed and started by systemd)"
  exit 0
fi
if ! grep -q 'PACKAGE-TEST' "$work/console.log"; then
  tail -n 30 "$work/console.log"
  if grep -qiE 'qemu|kvm|could not' "$work/console.log"; then skip "the VM did not boot"; fi
fi
echo "test-package-vm: FAIL" >&2
exit 1
