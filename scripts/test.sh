#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, checks formatting and
# lints, builds the guest components once, runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# One clean build, so incremental caches would only cost disk (several GB over the workspace).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "Toolchain: $(rustc --version), guest target wasm32-wasip2"
# A full disk shows up later as linker bus errors or half-written artifacts; say it plainly first.
free_kib=$(df -Pk "${CARGO_TARGET_DIR:-.}" 2>/dev/null | awk 'NR == 2 { print $4 }')
if [[ -n "$free_kib" && "$free_kib" -lt $((4 * 1024 * 1024)) ]]; then
  echo "warning: only $((free_kib / 1024)) MiB free for the build; a clean run needs about 4 GiB" >&2
fi
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
