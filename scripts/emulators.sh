#!/usr/bin/env bash
# Local AWS emulators for the tests and for trying kinesis-host by hand:
#   Kinesis:  kinesis-local (kinesis-mock compiled to JS), pinned below
#   DynamoDB: dynalite, pinned below
# Both are npm packages without native builds; they are installed into .local/emulators (gitignored)
# and only ever listen on 127.0.0.1.
#
# Usage:
#   scripts/emulators.sh install
#   scripts/emulators.sh start [--kinesis-port P] [--kinesis-tls-port P] [--dynamodb-port P]
#                              [--watch-pid PID] [--dir DIR]
#   scripts/emulators.sh stop [--dir DIR]
#   scripts/emulators.sh status [--dir DIR]
#
# `start` installs when needed, starts both emulators (free ports unless given), waits until both
# answer API calls and prints, on stdout:
#   KINESIS_ENDPOINT=http://127.0.0.1:P
#   DYNAMODB_ENDPOINT=http://127.0.0.1:P
# With --watch-pid PID, each emulator exits by itself within about a second after process PID is
# gone (the tests pass their own pid, so they never leak emulators). DIR (default
# .local/emulators/run) holds the logs, pid files and endpoints.env.
#
# Clients must send some SigV4 Authorization header (the signature is not checked); any static
# credentials in region us-east-1 work. kinesis-local also serves TLS + HTTP/2 on the TLS port
# (self-signed certificate); see endpoints.env.
set -euo pipefail

KINESIS_LOCAL_VERSION=0.6.2
DYNALITE_VERSION=4.0.0
READY_TIMEOUT_SECS=60
# How long streams/consumers/tables stay in their transitional states (AWS takes seconds).
KINESIS_TRANSITION=100ms
DYNAMODB_TRANSITION_MS=50

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$script_dir/.." && pwd -P)
install_dir="$root/.local/emulators"
preload="$script_dir/force-loopback.js"
default_run_dir="$install_dir/run"

die() {
  printf 'emulators.sh: error: %s\n' "$*" >&2
  exit 1
}
note() { printf 'emulators.sh: %s\n' "$*" >&2; }

usage() {
  sed -n '/^# Usage:/,/^# `start`/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

require_node() {
  command -v node > /dev/null 2>&1 \
    || die "node is not installed (Node 18+ needed); on Debian/Ubuntu: sudo apt-get install nodejs npm"
  command -v npm > /dev/null 2>&1 \
    || die "npm is not installed; on Debian/Ubuntu: sudo apt-get install npm"
}

# The installed version of package $1, or nothing.
installed_version() {
  local manifest="$install_dir/node_modules/$1/package.json"
  [[ -f $manifest ]] || return 0
  node -e 'try { process.stdout.write(String(require(process.argv[1]).version || "")) } catch (_) {}' \
    "$manifest"
}

is_installed() {
  [[ $(installed_version kinesis-local) == "$KINESIS_LOCAL_VERSION" ]] \
    && [[ $(installed_version dynalite) == "$DYNALITE_VERSION" ]]
}

cmd_install() {
  [[ $# -eq 0 ]] || usage
  require_node
  is_installed && return 0
  mkdir -p "$install_dir"
  # Several test processes may start emulators at once: one installs, the others wait. The lock
  # fd lives only in this subshell, so the emulators started later never inherit it.
  (
    if command -v flock > /dev/null 2>&1; then
      flock -w 300 9 || die "timed out waiting for another install ($install_dir/.install.lock)"
    fi
    is_installed && exit 0
    note "installing kinesis-local@$KINESIS_LOCAL_VERSION and dynalite@$DYNALITE_VERSION into $install_dir"
    cd "$install_dir"
    [[ -f package.json ]] || printf '{\n  "private": true\n}\n' > package.json
    # --ignore-scripts: nothing needs building. dynalite's optional LevelDB backend (classic-level)
    # ships prebuilt binaries, and the in-memory mode used here does not load it anyway.
    log=$(mktemp)
    if ! npm install --no-audit --no-fund --save-exact --ignore-scripts --loglevel=error \
      --no-progress "kinesis-local@$KINESIS_LOCAL_VERSION" "dynalite@$DYNALITE_VERSION" \
      > "$log" 2>&1; then
      cat "$log" >&2
      rm -f "$log"
      die "npm install failed (see above)"
    fi
    rm -f "$log"
    is_installed || die "npm install finished but the pinned versions are not in $install_dir/node_modules"
  ) 9> "$install_dir/.install.lock"
}

# Prints $1 free TCP ports on 127.0.0.1, one a line (all held open at once, so they differ).
free_ports() {
  node -e '
    const net = require("net");
    const n = Number(process.argv[1]);
    const servers = [];
    const done = () => {
      console.log(servers.map((s) => s.address().port).join("\n"));
      servers.forEach((s) => s.close());
    };
    for (let i = 0; i < n; i++) {
      const s = net.createServer();
      s.listen(0, "127.0.0.1", () => { servers.push(s); if (servers.length === n) done(); });
    }
  ' "$1"
}

# Fails, naming them, when any of the given ports is taken on 127.0.0.1.
ports_free() {
  node -e '
    const net = require("net");
    const ports = process.argv.slice(1).map(Number);
    let pending = ports.length;
    const busy = [];
    for (const port of ports) {
      const s = net.createServer();
      s.once("error", () => { busy.push(port); if (--pending === 0) finish(); });
      s.listen(port, "127.0.0.1", () => s.close(() => { if (--pending === 0) finish(); }));
    }
    function finish() {
      if (busy.length) { console.error(busy.join(" ")); process.exit(1); }
    }
  ' "$@"
}

# Milliseconds since the epoch (bash 5), or whole seconds times 1000 with older shells.
now_ms() {
  if [[ -n ${EPOCHREALTIME:-} ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
  else
    echo $((SECONDS * 1000))
  fi
}

# True when process $1 exists and has not exited (an exited one that is not reaped yet still
# answers kill -0; on Linux, /proc tells it apart).
alive() {
  [[ -n $1 ]] && kill -0 "$1" 2> /dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2> /dev/null) || return 0
  stat=${stat##*) }
  [[ ${stat:0:1} != [ZX] ]]
}

# True when process $1 is alive and is one of our emulators (pid files can outlive their process,
# and the pid can be reused by an unrelated one).
ours() {
  alive "$1" || return 1
  [[ $(ps -o args= -p "$1" 2> /dev/null) == *"$preload"* ]]
}

pid_from() { [[ -f $1 ]] && cat "$1" || true; }

# HTTP status of an API call (POST / with X-Amz-Target $2, content type $3) to port $1.
probe() {
  local port=$1 target=$2 ctype=$3
  local auth='AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20200101/us-east-1/x/aws4_request, SignedHeaders=host;x-amz-date, Signature=00'
  if command -v curl > /dev/null 2>&1; then
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST \
      -H "X-Amz-Target: $target" -H "Content-Type: $ctype" -H "Authorization: $auth" \
      -H 'X-Amz-Date: 20200101T000000Z' --data '{}' "http://127.0.0.1:$port/" || true
  else
    node -e '
      const [port, target, ctype, auth] = process.argv.slice(1);
      const req = require("http").request({ host: "127.0.0.1", port, method: "POST", path: "/",
        timeout: 5000, headers: { "X-Amz-Target": target, "Content-Type": ctype,
        "Authorization": auth, "X-Amz-Date": "20200101T000000Z" } }, (res) => {
          process.stdout.write(String(res.statusCode)); res.resume(); });
      req.on("error", () => process.stdout.write("000"));
      req.on("timeout", () => req.destroy());
      req.end("{}");
    ' "$port" "$target" "$ctype" "$auth" || true
  fi
}

log_tail() {
  printf '\n--- last lines of %s ---\n' "$1" >&2
  tail -n 30 "$1" >&2 2> /dev/null || true
}

check_port() {
  [[ $2 =~ ^[0-9]+$ ]] && (($2 > 0 && $2 < 65536)) || die "$1 needs a port number, not '$2'"
}

cmd_start() {
  local kinesis_port='' kinesis_tls_port='' dynamodb_port='' watch_pid='' dir=$default_run_dir
  while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "$1 needs a value"
    case $1 in
      --kinesis-port) check_port "$1" "$2" && kinesis_port=$2 ;;
      --kinesis-tls-port) check_port "$1" "$2" && kinesis_tls_port=$2 ;;
      --dynamodb-port) check_port "$1" "$2" && dynamodb_port=$2 ;;
      --watch-pid)
        [[ $2 =~ ^[0-9]+$ ]] && (($2 > 0)) || die "--watch-pid needs a pid, not '$2'"
        alive "$2" || die "--watch-pid $2: no such process"
        watch_pid=$2
        ;;
      --dir) dir=$2 ;;
      *) usage ;;
    esac
    shift 2
  done

  cmd_install
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd -P)
  local kpid_file="$dir/kinesis.pid" dpid_file="$dir/dynamodb.pid"
  local klog="$dir/kinesis.log" dlog="$dir/dynamodb.log"
  if ours "$(pid_from "$kpid_file")" || ours "$(pid_from "$dpid_file")"; then
    die "emulators already run from $dir (scripts/emulators.sh status --dir $dir); stop them first"
  fi
  rm -f "$kpid_file" "$dpid_file" "$dir/endpoints.env"

  # Free ports for whatever was not given.
  local ports=() missing=0 p
  for p in "$kinesis_port" "$kinesis_tls_port" "$dynamodb_port"; do [[ -n $p ]] || missing=$((missing + 1)); done
  if ((missing > 0)); then mapfile -t ports < <(free_ports "$missing"); fi
  [[ -n $kinesis_port ]] || { kinesis_port=${ports[0]}; ports=("${ports[@]:1}"); }
  [[ -n $kinesis_tls_port ]] || { kinesis_tls_port=${ports[0]}; ports=("${ports[@]:1}"); }
  [[ -n $dynamodb_port ]] || { dynamodb_port=${ports[0]}; ports=("${ports[@]:1}"); }

  local busy
  busy=$(ports_free "$kinesis_port" "$kinesis_tls_port" "$dynamodb_port" 2>&1) \
    || die "port(s) already in use on 127.0.0.1: $busy"

  local started kinesis_dir="$install_dir/node_modules/kinesis-local"
  started=$(now_ms)
  # kinesis-local is configured through its environment only. It has no bind-address option, so
  # the preload pins it to loopback. Its TLS certificate (server.json) is looked up relative to the
  # working directory by default, hence the cd and the absolute path.
  (
    cd "$kinesis_dir"
    exec env EMULATORS_WATCH_PID="$watch_pid" \
      KINESIS_MOCK_PLAIN_PORT="$kinesis_port" KINESIS_MOCK_TLS_PORT="$kinesis_tls_port" \
      KINESIS_MOCK_CERT_PATH="$kinesis_dir/server.json" \
      AWS_REGION=us-east-1 AWS_ACCOUNT_ID=000000000000 SHOULD_PERSIST_DATA=false LOG_LEVEL=WARN \
      SHARD_LIMIT=1000 \
      CREATE_STREAM_DURATION=$KINESIS_TRANSITION DELETE_STREAM_DURATION=$KINESIS_TRANSITION \
      SPLIT_SHARD_DURATION=$KINESIS_TRANSITION MERGE_SHARDS_DURATION=$KINESIS_TRANSITION \
      UPDATE_SHARD_COUNT_DURATION=$KINESIS_TRANSITION UPDATE_STREAM_MODE_DURATION=$KINESIS_TRANSITION \
      REGISTER_STREAM_CONSUMER_DURATION=$KINESIS_TRANSITION \
      DEREGISTER_STREAM_CONSUMER_DURATION=$KINESIS_TRANSITION \
      START_STREAM_ENCRYPTION_DURATION=$KINESIS_TRANSITION \
      STOP_STREAM_ENCRYPTION_DURATION=$KINESIS_TRANSITION \
      node -r "$preload" main.js
  ) > "$klog" 2>&1 < /dev/null &
  echo $! > "$kpid_file"
  EMULATORS_WATCH_PID="$watch_pid" node -r "$preload" "$install_dir/node_modules/dynalite/cli.js" \
    --host 127.0.0.1 --port "$dynamodb_port" --createTableMs "$DYNAMODB_TRANSITION_MS" \
    --deleteTableMs "$DYNAMODB_TRANSITION_MS" --updateTableMs "$DYNAMODB_TRANSITION_MS" \
    > "$dlog" 2>&1 < /dev/null &
  echo $! > "$dpid_file"

  local kinesis_ready='' dynamodb_ready='' deadline=$((SECONDS + READY_TIMEOUT_SECS))
  while [[ -z $kinesis_ready || -z $dynamodb_ready ]]; do
    if [[ -z $kinesis_ready ]]; then
      if [[ $(probe "$kinesis_port" Kinesis_20131202.ListStreams application/x-amz-json-1.1) == 200 ]]; then
        kinesis_ready=1
      elif ! alive "$(pid_from "$kpid_file")"; then
        log_tail "$klog"
        cmd_stop --dir "$dir" 2> /dev/null || true
        die "kinesis-local exited during startup (port $kinesis_port, TLS port $kinesis_tls_port); log: $klog"
      fi
    fi
    if [[ -z $dynamodb_ready ]]; then
      if [[ $(probe "$dynamodb_port" DynamoDB_20120810.ListTables application/x-amz-json-1.0) == 200 ]]; then
        dynamodb_ready=1
      elif ! alive "$(pid_from "$dpid_file")"; then
        log_tail "$dlog"
        cmd_stop --dir "$dir" 2> /dev/null || true
        die "dynalite exited during startup (port $dynamodb_port); log: $dlog"
      fi
    fi
    if [[ -z $kinesis_ready || -z $dynamodb_ready ]]; then
      if ((SECONDS >= deadline)); then
        [[ -n $kinesis_ready ]] || log_tail "$klog"
        [[ -n $dynamodb_ready ]] || log_tail "$dlog"
        cmd_stop --dir "$dir" 2> /dev/null || true
        local waiting=() list
        [[ -n $kinesis_ready ]] || waiting+=("kinesis-local (port $kinesis_port)")
        [[ -n $dynamodb_ready ]] || waiting+=("dynalite (port $dynamodb_port)")
        list=$(printf '%s and ' "${waiting[@]}")
        die "timed out after ${READY_TIMEOUT_SECS}s waiting for ${list% and } to answer; logs in $dir"
      fi
      sleep 0.1
    fi
  done

  # A port taken between the check above and the start could have let another server answer.
  if ! alive "$(pid_from "$kpid_file")" || ! alive "$(pid_from "$dpid_file")"; then
    log_tail "$klog"
    log_tail "$dlog"
    cmd_stop --dir "$dir" 2> /dev/null || true
    die "an emulator exited right after answering; see the logs in $dir"
  fi
  {
    echo "KINESIS_ENDPOINT=http://127.0.0.1:$kinesis_port"
    echo "KINESIS_TLS_ENDPOINT=https://127.0.0.1:$kinesis_tls_port"
    echo "DYNAMODB_ENDPOINT=http://127.0.0.1:$dynamodb_port"
  } > "$dir/endpoints.env"
  note "ready in $(($(now_ms) - started)) ms (logs and pid files in $dir$([[ -z $watch_pid ]] || echo "; exit with process $watch_pid"))"
  echo "KINESIS_ENDPOINT=http://127.0.0.1:$kinesis_port"
  echo "DYNAMODB_ENDPOINT=http://127.0.0.1:$dynamodb_port"
}

parse_dir_only() {
  dir=$default_run_dir
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; dir=$2; shift 2 ;;
      *) usage ;;
    esac
  done
}

cmd_stop() {
  local dir
  parse_dir_only "$@"
  local pids=() name pid
  for name in kinesis dynamodb; do
    pid=$(pid_from "$dir/$name.pid")
    if ours "$pid"; then
      kill "$pid" 2> /dev/null || true
      pids+=("$pid")
    fi
    rm -f "$dir/$name.pid"
  done
  rm -f "$dir/endpoints.env"
  ((${#pids[@]} > 0)) || { note "not running (no live pid files in $dir)"; return 0; }
  local waited=0
  for pid in "${pids[@]}"; do
    while alive "$pid"; do
      if ((waited >= 100)); then # 10 s
        note "pid $pid ignored SIGTERM; killing it"
        kill -9 "$pid" 2> /dev/null || true
        break
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
  done
  note "stopped (pids ${pids[*]})"
}

cmd_status() {
  local dir
  parse_dir_only "$@"
  local name pid rc=0
  if is_installed; then
    echo "installed: kinesis-local@$KINESIS_LOCAL_VERSION dynalite@$DYNALITE_VERSION in $install_dir"
  else
    echo "not installed (scripts/emulators.sh install)"
  fi
  for name in kinesis dynamodb; do
    pid=$(pid_from "$dir/$name.pid")
    if ours "$pid"; then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"
      rc=3
    fi
  done
  if ((rc == 0)) && [[ -f $dir/endpoints.env ]]; then cat "$dir/endpoints.env"; fi
  return "$rc"
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
  install) cmd_install "$@" ;;
  start) require_node && cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  status) require_node && cmd_status "$@" ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
