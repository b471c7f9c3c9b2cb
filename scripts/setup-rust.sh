#!/usr/bin/env bash
# Makes sure a Rust toolchain (edition 2024: 1.85 or newer) is on PATH.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
if command -v cargo >/dev/null 2>&1; then exit 0; fi
echo "[setup] cargo not found: install Rust with rustup (https://rustup.rs) or apt-get install cargo (1.85+)" >&2
if command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq cargo rustc >/dev/null
fi
command -v cargo >/dev/null 2>&1
