#!/usr/bin/env bash
# Builds every plugin of this workspace as a WebAssembly component:
#   plugins/target/wasm32-wasip2/release/<crate_name>.wasm
# The plugin host's tests (host/plugin-host/tests) load the files from there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
# Always build into this workspace's own target dir, even if CARGO_TARGET_DIR is set.
export CARGO_TARGET_DIR="$here/target"
cargo build --target wasm32-wasip2 --release "$@"
ls -1 "$here"/target/wasm32-wasip2/release/*.wasm
