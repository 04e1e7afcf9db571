#!/usr/bin/env bash
# Quick start: build kinesis-host and the `hello` example task, then replay sample records
# through it locally (no AWS needed), and show what `check` says about the component.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

echo "==> Building kinesis-host and the example tasks"
cargo build --locked -p kinesis-host
cargo build --locked --profile guest --target wasm32-wasip2 \
  -p hello -p filter-route -p word-count
host=target/debug/kinesis-host
tasks=target/wasm32-wasip2/guest

echo
echo "==> kinesis-host check $tasks/hello.wasm"
"$host" check "$tasks/hello.wasm"

echo
echo "==> kinesis-host replay $tasks/hello.wasm --input examples/hello/records.jsonl"
"$host" replay "$tasks/hello.wasm" --input examples/hello/records.jsonl

echo
echo "==> kinesis-host replay $tasks/filter_route.wasm (emits records containing ERROR)"
"$host" replay "$tasks/filter_route.wasm" --input examples/filter-route/records.jsonl \
  --config examples/filter-route/job.properties --log warn

echo
echo "==> kinesis-host replay $tasks/word_count.wasm (counts words in per-shard state)"
"$host" replay "$tasks/word_count.wasm" --input examples/word-count/records.jsonl \
  --config examples/word-count/job.properties --log warn
