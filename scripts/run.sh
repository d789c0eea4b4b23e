#!/usr/bin/env bash
# Sets up what the server needs on a fresh machine, builds it and starts it on the local backend.
# Extra arguments are passed to poseidon (e.g. --config configuration.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null 2>&1; then
  echo "installing bubblewrap"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap; else sudo apt-get update -qq && sudo apt-get install -y -qq bubblewrap; fi
fi
cargo build --release --bin poseidon
exec ./target/release/poseidon "$@"
