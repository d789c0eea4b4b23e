#!/usr/bin/env bash
# Builds every plugin of this directory as a WebAssembly component:
#   plugins/target/wasm32-wasip2/release/<crate_name>.wasm    (Rust: the cargo workspace here)
#   plugins/target/wasm32-wasip2/release/<dir_name>.wasm      (Python: python/<dir>/app.py, dashes → underscores)
# The plugin host's tests (host/plugin-host/tests) and tests/plugins.rs load the files from there.
#
# Python plugins are built with componentize-py from PyPI, installed on first use into a
# virtual environment under $POSEIDON_PLUGIN_TOOLS (default ~/.cache/poseidon/plugin-tools);
# each python/<dir>/ holds app.py, a file `world` naming the WIT world (e.g.
# pool-sizer-plugin, or package/world for a world of the plugin's own wit/ directory) and
# optionally wit/ with more WIT files. A component is rebuilt only when its sources changed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
# Always build into this workspace's own target dir, even if CARGO_TARGET_DIR is set.
export CARGO_TARGET_DIR="$here/target"
cargo build --target wasm32-wasip2 --release "$@"
# Arguments select Rust crates (`-p jwt-auth`): then the Python plugins are not built.
if [ $# -gt 0 ]; then
    exit 0
fi

componentize_py_version=0.25.1
tools="${POSEIDON_PLUGIN_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/poseidon/plugin-tools}"
venv="$tools/componentize-py-$componentize_py_version"
out="$here/target/wasm32-wasip2/release"
for app in python/*/app.py; do
    [ -e "$app" ] || continue
    dir="$(dirname "$app")"
    name="$(basename "$dir" | tr - _)"
    wasm="$out/$name.wasm"
    if [ -f "$wasm" ] && [ -z "$(find "$dir" ../wit/v0.2 -newer "$wasm" -type f -not -path "*/__pycache__/*" -print -quit)" ]; then
        continue
    fi
    # A venv cannot be moved (its scripts name its path): `.installed` marks a finished install.
    if [ ! -e "$venv/.installed" ]; then
        echo "installing componentize-py $componentize_py_version into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$componentize_py_version"
        touch "$venv/.installed"
    fi
    wit_args=(-d "$here/../wit/v0.2")
    [ -d "$dir/wit" ] && wit_args+=(-d "$here/$dir/wit")
    echo "componentize-py: $dir → $wasm"
    (cd "$dir" && "$venv/bin/componentize-py" --quiet "${wit_args[@]}" -w "$(tr -d '[:space:]' < world)" \
        componentize app -o "$wasm.partial")
    mv "$wasm.partial" "$wasm"
done
ls -1 "$out"/*.wasm
