#!/usr/bin/env bash
# Sets up what the server needs on a fresh machine, builds it and starts it on the local backend.
# Extra arguments are passed to poseidon (e.g. --config configuration.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v pasta >/dev/null 2>&1 || need+=(passt)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
fi
# pasta (runners' user-mode network) opens /dev/net/tun as the runner's uid; standard distributions
# leave it 0666, some containers 0600.
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ] && [ "$(id -u)" = 0 ]; then
  chmod 0666 /dev/net/tun
fi
# The runner agent runs inside every sandbox: a static (musl) build runs in any image.
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl; then
  cargo build --release -p poseidon-agent --target x86_64-unknown-linux-musl
  cargo build --release --bin poseidon
  cp target/x86_64-unknown-linux-musl/release/poseidon-agent target/release/poseidon-agent
else
  cargo build --release --bin poseidon -p poseidon-agent
fi
exec ./target/release/poseidon "$@"
