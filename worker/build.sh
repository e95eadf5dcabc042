#!/usr/bin/env bash
# Builds the Worker into worker/build (index.js and index_bg.wasm) with
# worker-build, offline: wasm-bindgen from setup.sh's cache, esbuild from
# wrangler's own npm dependency. Run setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")"
unset RUSTFLAGS
tools=${POSTAI_TOOLS:-$HOME/.cache/postai-tools}
bindgen=$(grep -A1 '^name = "wasm-bindgen"$' ../Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
export WASM_BINDGEN_BIN="$tools/wasm-bindgen-$bindgen/bin/wasm-bindgen"
export ESBUILD_BIN
ESBUILD_BIN=$(node -e 'console.log(require("esbuild/lib/main.js") && require.resolve("esbuild").replace(/lib\/main\.js$/, "bin/esbuild"))')
for tool in "$WASM_BINDGEN_BIN" "$ESBUILD_BIN" "$tools/worker-build-0.8.7/bin/worker-build"; do
  [ -x "$tool" ] || { echo "missing $tool: run worker/setup.sh first" >&2; exit 1; }
done
"$tools/worker-build-0.8.7/bin/worker-build" --release
ls -l build/index.js build/index_bg.wasm
