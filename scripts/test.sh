#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, checks formatting and
# lints, builds the guest components once, runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Toolchain: $(rustc --version), guest target wasm32-wasip2"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

step "Formatting"
cargo fmt --all -- --check

# Every guest package (examples, test fixtures, benchmark guests), by name.
guests=()
for manifest in examples/*/Cargo.toml tests/guests/*/Cargo.toml bench/guests/*/Cargo.toml; do
  guests+=(-p "$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -n 1)")
done

step "Lints (host and guests, native and wasm32-wasip2)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy "${guests[@]}" -p kinesis-task --target wasm32-wasip2 --locked -- -D warnings

step "Guest components (built once; the tests reuse them)"
cargo build --locked --profile guest --target wasm32-wasip2 "${guests[@]}"

step "AWS emulators (kinesis-local, dynalite) for the integration tests, which start them"
scripts/emulators.sh install

step "Tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
