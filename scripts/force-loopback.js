// Preload (`node -r ./force-loopback.js ...`) for the local AWS emulators that
// scripts/emulators.sh starts. It does two things:
//
// 1. Every TCP server the process opens listens on 127.0.0.1 only. kinesis-local has no option to
//    choose the bind address (it listens on all interfaces), so `net.Server.prototype.listen` is
//    wrapped to replace or add the host. HTTP, HTTPS, TLS and HTTP/2 servers all inherit from
//    net.Server, so they are covered too. Unix-socket and handle listens are left alone.
//
// 2. With EMULATORS_WATCH_PID=<pid>, the process exits by itself soon (within ~0.5 s) after that
//    process has gone. Test processes pass their own pid, so emulators never outlive them. The
//    timer is unref()'d: it never keeps node alive on its own.
'use strict';

const net = require('net');
const fs = require('fs');

const LOOPBACK = '127.0.0.1';

function isPort(value) {
  return (
    (typeof value === 'number' && Number.isInteger(value)) ||
    (typeof value === 'string' && /^\d+$/.test(value))
  );
}

const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listenOnLoopback(...args) {
  const first = args[0];
  if (args.length === 0 || first === undefined || first === null || typeof first === 'function') {
    // listen() / listen(cb): a random port on all interfaces -> a random port on loopback.
    args.splice(0, first === undefined || first === null ? 1 : 0, 0, LOOPBACK);
  } else if (isPort(first)) {
    // listen(port[, host][, backlog][, cb])
    if (typeof args[1] === 'string' || args[1] === undefined || args[1] === null) {
      args[1] = LOOPBACK;
    } else {
      args.splice(1, 0, LOOPBACK);
    }
  } else if (typeof first === 'object' && !first._handle && first.fd === undefined &&
             first.path === undefined && !(first instanceof net.Server) &&
             !(first instanceof net.Socket)) {
    // listen({ port, host, ... }[, cb])
    args[0] = Object.assign({}, first, { host: LOOPBACK });
  }
  return originalListen.apply(this, args);
};

const watched = process.env.EMULATORS_WATCH_PID;
if (watched !== undefined && watched !== '') {
  if (!/^\d+$/.test(watched) || Number(watched) <= 0) {
    console.error(`force-loopback.js: EMULATORS_WATCH_PID must be a pid, not "${watched}"`);
    process.exit(2);
  }
  const pid = Number(watched);

  const alive = () => {
    try {
      process.kill(pid, 0);
    } catch (err) {
      // EPERM: it exists but belongs to someone else; anything else (ESRCH): it is gone.
      if (err.code !== 'EPERM') return false;
    }
    // An exited process whose parent has not reaped it yet still answers signal 0. On Linux,
    // treat such a zombie ("Z" state) as gone.
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
      if (state === 'Z' || state === 'X') return false;
    } catch (_) {
      // No /proc (not Linux), or the process vanished between the two checks: decided above or
      // on the next tick.
    }
    return true;
  };

  const check = () => {
    if (!alive()) {
      console.error(`force-loopback.js: watched process ${pid} exited; shutting down`);
      process.exit(0);
    }
  };
  check();
  setInterval(check, 500).unref();
}
