#!/usr/bin/env bash
# Runs the local backend's integration tests (tests/sandbox.rs and the local:: API scenarios) inside
# a cgroup-v2-only Debian 12 under qemu (shared/tools/cgroup2-vm), because that is the kind of host
# users have (this machine is cgroup v1). Called by scripts/test.sh after the normal tests.
#
#   tests/cgroup2/run.sh            builds the test binaries (debug), copies them into the VM, runs them
#
# Says "skipped" (exit 0) when the VM tool or qemu cannot run here; fails when a test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
tool=../shared/tools/cgroup2-vm/run.sh
if [ ! -x "$tool" ] && [ ! -f "$tool" ]; then
  echo "skipped: cgroup v2 VM tests ($tool is missing)"
  exit 0
fi
# The test binaries and the server they start.
json=$(cargo test -p poseidon --test sandbox --test api --no-run --message-format=json 2>/dev/null)
bins=$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
')
cargo build -q -p poseidon -p poseidon-agent
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$target/debug/poseidon" "$target/debug/poseidon-agent" "$dir/"
while read -r name exe; do cp "$exe" "$dir/test-$name"; done <<<"$bins"
# A JVM for sandbox's ignored JVM test, which needs cgroup v2 (the VM has no JVM): a runtime of
# java.base only, made with jlink from this machine's JDK.
if command -v jlink >/dev/null &&
  jlink --add-modules java.base --strip-debug --no-man-pages --no-header-files --output "$dir/jre" >/dev/null 2>&1; then
  echo "the JVM test runs in the VM (a jlink'ed runtime of $(jlink --version))"
else
  echo "skipped: the JVM test in the cgroup v2 VM (no jlink on this machine)"
fi
cat >"$dir/payload.sh" <<EOS
#!/bin/sh
# Inside the VM: the test binaries look for the server where cargo built it.
mkdir -p "$target/debug"
ln -sf /mnt/host/poseidon "$target/debug/poseidon"
ln -sf /mnt/host/poseidon-agent "$target/debug/poseidon-agent"
[ -c /dev/net/tun ] || { mkdir -p /dev/net; mknod /dev/net/tun c 10 200; }
# Every real host has an /etc/hosts (debootstrap's minimal root has none); a sandbox that shows the
# host's /etc gets its own in its place.
[ -f /etc/hosts ] || printf '127.0.0.1 localhost\n' >/etc/hosts
chmod 0666 /dev/net/tun
# pasta needs a routable interface, as every real host has; the VM has no NIC, so a dummy one with
# a default route stands in (no test sends traffic through it: they look at routes, loopback and
# forwarded ports only).
ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy
ip link set dummy0 up && ip addr add 10.0.2.15/24 dev dummy0 && ip route add default via 10.0.2.2 dev dummy0
echo "cgroup: \$(cat /proc/self/cgroup)"
status=0
cd /tmp
/mnt/host/test-sandbox --test-threads=1 ${VM_TEST_FILTER:-} || status=1
/mnt/host/test-api --test-threads=1 ${VM_API_FILTER:-local:: runners_survive} || status=1
if [ -d /mnt/host/jre ]; then
  cp -a /mnt/host/jre /opt/jre
  POSEIDON_TEST_JAVA=/opt/jre/bin/java /mnt/host/test-sandbox --ignored --exact \
    the_jvm_sizes_its_heap_from_the_runners_memory_limit --test-threads=1 || status=1
fi
exit \$status
EOS
chmod +x "$dir/payload.sh"
echo "running the local backend's tests in a cgroup v2 VM (qemu, software emulation)"
set +e
bash "$tool" "$dir/payload.sh" "$dir" 2>&1 | tee "$dir/vm.log" | grep -vE '^(\s*$|---- |stack backtrace|   [0-9]+: |             at )' 
code=${PIPESTATUS[0]}
set -e
# A VM that could not boot is a skip; one whose tests started (and failed, or were cut off by the
# VM's time limit) is a failure.
if [ "$code" -ne 0 ] && ! grep -qE "test result|^test .*FAILED|^running [0-9]+ tests?" "$dir/vm.log"; then
  if grep -qiE "qemu|debootstrap|kvm|No such file" "$dir/vm.log"; then
    echo "skipped: cgroup v2 VM tests (the VM could not run here):"
    tail -n 5 "$dir/vm.log"
    exit 0
  fi
  tail -n 30 "$dir/vm.log"
fi
exit "$code"
