#!/usr/bin/env bash
# Quick start: one command, on a machine with Rust, Node.js/npm and python3, that runs a job end to
# end on local emulators, with no AWS account:
#
#   1. builds kinesis-host and the example tasks (adds the wasm32-wasip2 target if missing);
#   2. installs (pinned, into .local/emulators) and starts kinesis-local and dynalite on
#      127.0.0.1:4568 and 127.0.0.1:4569, the endpoints of examples/quickstart/job.properties;
#   3. creates the input stream quickstart-logs (2 shards) and the output stream
#      quickstart-errors (1 shard), and writes the sample records of examples/filter-route;
#   4. runs `kinesis-host run filter_route.wasm --config examples/quickstart/job.properties` until
#      the records containing ERROR are in quickstart-errors, shows the lease table, stops the
#      host with SIGTERM and shows the output stream and the lease table after the stop;
#   5. writes more records and runs the host again: it resumes after the checkpoints;
#   6. replays the other examples' sample records (`kinesis-host replay`, no emulators).
#
# The emulators are stopped at the end, and also when anything fails or on Ctrl-C (they also exit
# by themselves once this script's process is gone). Every wait is bounded. If the two ports are
# taken, set QUICKSTART_KINESIS_PORT / QUICKSTART_DYNAMODB_PORT: the script then runs a copy of
# the job.properties with those ports.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=examples/quickstart/job.properties
RECORDS=examples/filter-route/records.jsonl
INPUT=quickstart-logs
OUTPUT=quickstart-errors
LEASE_TABLE=quickstart-1-$INPUT # <job.name>-<job.id>-<stream>
KINESIS_PORT=${QUICKSTART_KINESIS_PORT:-4568}
DYNAMODB_PORT=${QUICKSTART_DYNAMODB_PORT:-4569}
RUN_TIMEOUT_SECS=60  # for the outputs of one run to arrive
STOP_TIMEOUT_SECS=30 # for the host to exit after SIGTERM
DIR=.local/emulators/quickstart
HOST=target/debug/kinesis-host
TASKS=target/wasm32-wasip2/guest
AWS_LOCAL=scripts/aws_local.py

# Milliseconds since the epoch (bash 5), or whole seconds times 1000 with older shells.
now_ms() {
  if [[ -n ${EPOCHREALTIME:-} ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
  else
    echo $((SECONDS * 1000))
  fi
}
started_ms=$(now_ms)
since() { # seconds since $1 (ms), one decimal
  local d=$(($(now_ms) - $1))
  printf '%d.%d' $((d / 1000)) $((d % 1000 / 100))
}
step() { printf '\n==> %s   [%s s]\n' "$*" "$(since "$started_ms")"; }
die() {
  printf 'quickstart: error: %s\n' "$*" >&2
  exit 1
}

host_pid=''
emulators_started=''
cleanup() {
  local rc=$?
  if [[ -n $host_pid ]] && kill -0 "$host_pid" 2> /dev/null; then
    kill -TERM "$host_pid" 2> /dev/null || true
    for _ in $(seq 1 100); do kill -0 "$host_pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$host_pid" 2> /dev/null || true
  fi
  if [[ -n $emulators_started ]]; then
    scripts/emulators.sh stop --dir "$DIR" > /dev/null 2>&1 || true
  fi
  if ((rc != 0)); then
    printf '\nquickstart: failed after %s s%s\n' "$(since "$started_ms")" \
      "${emulators_started:+; the emulators' and the host's logs are in $DIR}" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in cargo rustup python3; do
  command -v "$tool" > /dev/null 2>&1 || die "$tool is not installed (needed: Rust via rustup, Node.js 18+ with npm, python3)"
done

step "Toolchain: $(rustc --version), guest target wasm32-wasip2"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

step "Building kinesis-host and the example tasks"
cargo build --locked -p kinesis-host
cargo build --locked --profile guest --target wasm32-wasip2 -p hello -p filter-route -p word-count

step "Starting the emulators: kinesis-local on 127.0.0.1:$KINESIS_PORT, dynalite on 127.0.0.1:$DYNAMODB_PORT"
mkdir -p "$DIR"
# Emulators left by an interrupted earlier run from this directory (only ours are stopped).
scripts/emulators.sh stop --dir "$DIR" > /dev/null 2>&1 || true
emulators_started=1
if ! endpoints=$(scripts/emulators.sh start --dir "$DIR" --watch-pid $$ \
  --kinesis-port "$KINESIS_PORT" --dynamodb-port "$DYNAMODB_PORT"); then
  die "the emulators did not start (see above). If a port is in use, free it or pick others:
  QUICKSTART_KINESIS_PORT=14568 QUICKSTART_DYNAMODB_PORT=14569 scripts/quickstart.sh"
fi
KINESIS_ENDPOINT='' DYNAMODB_ENDPOINT=''
while IFS='=' read -r name value; do
  case $name in
    KINESIS_ENDPOINT) KINESIS_ENDPOINT=$value ;;
    DYNAMODB_ENDPOINT) DYNAMODB_ENDPOINT=$value ;;
  esac
done <<< "$endpoints"
[[ -n $KINESIS_ENDPOINT && -n $DYNAMODB_ENDPOINT ]] \
  || die "scripts/emulators.sh printed no endpoints: $endpoints"
export KINESIS_ENDPOINT DYNAMODB_ENDPOINT
echo "Kinesis:  $KINESIS_ENDPOINT"
echo "DynamoDB: $DYNAMODB_ENDPOINT"

# The checked-in job.properties names the default ports; other ports get a copy.
config=$CONFIG
if [[ $KINESIS_ENDPOINT != http://127.0.0.1:4568 || $DYNAMODB_ENDPOINT != http://127.0.0.1:4569 ]]; then
  config=$DIR/job.properties
  sed -e "s|^systems.kinesis.aws.kinesis.endpoint=.*|systems.kinesis.aws.kinesis.endpoint=$KINESIS_ENDPOINT|" \
    -e "s|^systems.kinesis.aws.dynamodb.endpoint=.*|systems.kinesis.aws.dynamodb.endpoint=$DYNAMODB_ENDPOINT|" \
    "$CONFIG" > "$config"
  echo "Using $config: $CONFIG with these endpoints"
fi

step "Creating the streams and writing $(grep -c . "$RECORDS") records to $INPUT"
"$AWS_LOCAL" create-stream "$INPUT" --shards 2
"$AWS_LOCAL" create-stream "$OUTPUT" --shards 1
# Each record goes to the shard its shard_id names (by explicit hash key).
"$AWS_LOCAL" put "$INPUT" "$RECORDS"
"$AWS_LOCAL" read-all "$INPUT" --table

step "kinesis-host check $TASKS/filter_route.wasm --config $config"
"$HOST" check "$TASKS/filter_route.wasm" --config "$config"

# What the task emits for these records, without AWS: the live run must produce the same.
"$HOST" replay "$TASKS/filter_route.wasm" --input "$RECORDS" --config "$config" --log warn \
  --output "$DIR/expected.jsonl" 2> /dev/null
expected=$(grep -c . "$DIR/expected.jsonl" || true)

# Starts `kinesis-host run` in the background, logging to $1.
start_host() {
  "$HOST" run "$TASKS/filter_route.wasm" --config "$config" > /dev/null 2> "$1" &
  host_pid=$!
}

# Waits (bounded) until the output stream holds $1 records; fails if the host exits first.
wait_for_output() {
  local want=$1 log=$2 since_ms have=0
  since_ms=$(now_ms)
  while :; do
    have=$("$AWS_LOCAL" read-all "$OUTPUT" | grep -c . || true)
    ((have >= want)) && break
    if ! kill -0 "$host_pid" 2> /dev/null; then
      cat "$log" >&2
      die "kinesis-host exited before writing $want records to $OUTPUT (it wrote $have)"
    fi
    if (($(now_ms) - since_ms > RUN_TIMEOUT_SECS * 1000)); then
      cat "$log" >&2
      die "only $have of $want records reached $OUTPUT within ${RUN_TIMEOUT_SECS}s (host log above)"
    fi
    sleep 0.2
  done
  echo "$have of $want records in $OUTPUT after $(since "$since_ms") s"
}

# Waits (bounded) until every lease of the table has a sequence-number checkpoint.
wait_for_checkpoints() {
  local deadline=$((SECONDS + 15))
  while "$AWS_LOCAL" scan-table "$LEASE_TABLE" | grep -q -e TRIM_HORIZON -e LATEST; do
    ((SECONDS < deadline)) || return 0
    sleep 0.2
  done
}

# SIGTERM, then waits (bounded) for a clean exit.
stop_host() {
  local since_ms rc=0
  since_ms=$(now_ms)
  kill -TERM "$host_pid"
  for _ in $(seq 1 $((STOP_TIMEOUT_SECS * 10))); do
    kill -0 "$host_pid" 2> /dev/null || break
    sleep 0.1
  done
  kill -0 "$host_pid" 2> /dev/null && die "kinesis-host did not exit within ${STOP_TIMEOUT_SECS}s of SIGTERM"
  wait "$host_pid" || rc=$?
  host_pid=''
  ((rc == 0)) || die "kinesis-host exited with status $rc after SIGTERM"
  echo "kinesis-host exited (status 0) $(since "$since_ms") s after SIGTERM"
}

step "kinesis-host run $TASKS/filter_route.wasm --config $config"
echo "The task sends the records containing ERROR to $OUTPUT; the replay of the same records"
echo "emits $expected, so the host runs until $OUTPUT holds $expected records."
start_host "$DIR/host-1.log"
wait_for_output "$expected" "$DIR/host-1.log"
# task.commit.ms=1000: each shard is checkpointed about a second after it started.
wait_for_checkpoints
echo
echo "Lease table $LEASE_TABLE while the host runs (it holds both leases):"
"$AWS_LOCAL" scan-table "$LEASE_TABLE"
echo
stop_host

step "The host's log (also in $DIR/host-1.log)"
cat "$DIR/host-1.log"

step "Output stream $OUTPUT"
"$AWS_LOCAL" read-all "$OUTPUT" --table
"$AWS_LOCAL" read-all "$OUTPUT" > "$DIR/output-1.jsonl"
python3 - "$DIR/expected.jsonl" "$DIR/output-1.jsonl" << 'EOF'
import json, sys
def records(path):
    return sorted((r["partition_key"], r["data"]) for r in map(json.loads, open(path)) if r)
expected, got = records(sys.argv[1]), records(sys.argv[2])
if got != expected:
    sys.exit(f"quickstart: error: the output stream differs from the replay's output:\n"
             f"  replay: {expected}\n  stream: {got}")
print(f"Same {len(got)} records as `kinesis-host replay` emits for the same input.")
EOF

step "Lease table $LEASE_TABLE after the stop (checkpointed, leases released: no owner)"
"$AWS_LOCAL" scan-table "$LEASE_TABLE"

step "Writing 3 more records (1 with ERROR) and running the host again: it resumes after the checkpoints"
more=$DIR/more-records.jsonl
cat > "$more" << 'EOF'
{"shard_id": "shardId-000000000000", "partition_key": "web-3", "text": "INFO GET /cart 200"}
{"shard_id": "shardId-000000000001", "partition_key": "db-2", "text": "ERROR replica lag above 30 s"}
{"shard_id": "shardId-000000000001", "partition_key": "db-2", "text": "INFO replica caught up"}
EOF
"$AWS_LOCAL" put "$INPUT" "$more"
start_host "$DIR/host-2.log"
wait_for_output $((expected + 1)) "$DIR/host-2.log"
stop_host
echo
echo "Where each shard started (from host-2.log):"
grep 'Processing shard' "$DIR/host-2.log" | sed 's/^.*Processing shard\. /  /'
echo
"$AWS_LOCAL" read-all "$OUTPUT" --table
"$AWS_LOCAL" read-all "$OUTPUT" > "$DIR/output-2.jsonl"
python3 - "$DIR/output-2.jsonl" "$((expected + 1))" << 'EOF'
import json, sys
got = [(r["partition_key"], r["data"]) for r in map(json.loads, open(sys.argv[1]))]
if len(got) != int(sys.argv[2]) or len(set(got)) != len(got):
    sys.exit(f"quickstart: error: expected {sys.argv[2]} distinct records, got {got}")
print(f"{len(got)} records, none delivered twice.")
EOF
echo
"$AWS_LOCAL" scan-table "$LEASE_TABLE"

step "Stopping the emulators"
scripts/emulators.sh stop --dir "$DIR"
emulators_started=''

step "kinesis-host replay: the other examples, over recorded records (no emulators)"
echo "--- hello: logs every record"
"$HOST" replay "$TASKS/hello.wasm" --input examples/hello/records.jsonl
echo
echo "--- word-count: counts words in per-shard state and emits the counts"
"$HOST" replay "$TASKS/word_count.wasm" --input examples/word-count/records.jsonl \
  --config examples/word-count/job.properties --log warn

step "Done"
cat << EOF
Try it yourself: scripts/emulators.sh start (prints the endpoints), scripts/aws_local.py --help,
kinesis-host run <task.wasm> --config <job.properties>; see README.md and examples/*/README.md.
EOF
