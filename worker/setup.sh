#!/usr/bin/env bash
# Installs what building and testing the Worker needs, cached by version
# outside the repository ($POSTAI_TOOLS, default ~/.cache/postai-tools), so
# a warm machine skips it: wasm-bindgen-cli at exactly Cargo.lock's
# wasm-bindgen (worker-build refuses another), worker-build, and the npm
# packages of package-lock.json (wrangler, miniflare, the driver).
set -euo pipefail
cd "$(dirname "$0")"
unset RUSTFLAGS
tools=${POSTAI_TOOLS:-$HOME/.cache/postai-tools}
bindgen=$(grep -A1 '^name = "wasm-bindgen"$' ../Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
builder=0.8.7
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || rustup target add wasm32-unknown-unknown
# worker-build downloads nothing here, but links OpenSSL (its HTTP client's native TLS)
if ! pkg-config --exists openssl 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi
if [ ! -x "$tools/wasm-bindgen-$bindgen/bin/wasm-bindgen" ]; then
  cargo install -q wasm-bindgen-cli --version "=$bindgen" --root "$tools/wasm-bindgen-$bindgen"
fi
if [ ! -x "$tools/worker-build-$builder/bin/worker-build" ]; then
  cargo install -q worker-build --version "=$builder" --root "$tools/worker-build-$builder"
fi
npm ci --no-audit --no-fund --loglevel=error
"$tools/wasm-bindgen-$bindgen/bin/wasm-bindgen" --version
"$tools/worker-build-$builder/bin/worker-build" --version || true
