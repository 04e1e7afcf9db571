//! A fault-injecting HTTP/1.1 reverse proxy for the integration tests. It stands between the AWS
//! SDK clients and one emulator and answers chosen requests with throttling errors, server errors
//! or dropped connections, so tests can prove the host survives what the emulators never do.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "common/faults.rs"]
//! mod faults;
//! ```
//!
//! and point a client at the proxy instead of at the emulator:
//!
//! ```ignore
//! use faults::{Fault, FaultProxy, Rule};
//!
//! let e = emulators::emulators();
//! let kinesis = FaultProxy::start(
//!     &e.kinesis_endpoint,
//!     vec![Rule { target_suffix: "GetRecords", every: 3, fault: Fault::Throttle, limit: Some(10) }],
//! );
//! // ... AwsSettings { kinesis_endpoint: Some(kinesis.endpoint()), .. }
//! // ... run the host, check its output ...
//! assert!(kinesis.injected("GetRecords") > 0);
//! ```
//!
//! A rule matches a request when the request's `X-Amz-Target` header ends with the rule's
//! `target_suffix` (`Kinesis_20131202.GetRecords` ends with `GetRecords`; an empty suffix matches
//! every request that has the header). Every matching request counts for the rule, and the rule
//! fires on its `every`-th, `2 * every`-th, ... matching request until it has fired `limit` times.
//! Rules are tried in order and the first one that fires decides the fault; requests that no rule
//! fires for are forwarded unchanged, over one upstream connection per client connection.
//!
//! The proxy listens on an OS-chosen port of 127.0.0.1 and stops (closing every connection it
//! holds) when the [`FaultProxy`] is dropped. Every read and write has a 30-second timeout, so no
//! thread waits forever. An upstream that fails (or a malformed upstream response) is answered
//! with `502 Bad Gateway` and the client connection is closed.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Timeout of every read and write on client and upstream connections.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Upstream connections idle for longer are not reused (Node servers close idle ones after 5 s).
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);
/// Longest accepted line of a message head or of chunked framing.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines (and chunked trailer lines) accepted in one message.
const MAX_HEADERS: usize = 200;
/// Largest accepted message body (GetRecords responses can reach about 14 MiB).
const MAX_BODY: u64 = 256 * 1024 * 1024;

/// What the proxy does instead of forwarding a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `400 Bad Request` with `ProvisionedThroughputExceededException`, as Kinesis and DynamoDB
    /// answer when throttling; the connection stays open.
    Throttle,
    /// `500 Internal Server Error` with `InternalFailure`; the connection stays open.
    ServerError,
    /// The connection is closed without a response.
    Reset,
}

/// When to inject a fault; see the module documentation.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The end of the `X-Amz-Target` header to match, e.g. `"GetRecords"`, `"PutRecords"`,
    /// `"UpdateItem"`.
    pub target_suffix: &'static str,
    /// Inject on every Nth matching request (N >= 1; 1 means every matching request).
    pub every: u32,
    /// The fault to inject.
    pub fault: Fault,
    /// Stop injecting after this many faults (`None`: never stop).
    pub limit: Option<u32>,
}

/// A running proxy; see the module documentation. Dropping it stops it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream`
    /// (`"http://127.0.0.1:PORT"`).
    ///
    /// # Panics
    ///
    /// If `upstream` is not `http://HOST:PORT`, if a rule has `every == 0`, or if the proxy
    /// cannot listen.
    #[must_use = "the proxy stops when it is dropped"]
    pub fn start(upstream: &str, rules: Vec<Rule>) -> FaultProxy {
        for rule in &rules {
            assert!(
                rule.every >= 1,
                "FaultProxy rule for {:?}: every must be >= 1",
                rule.target_suffix
            );
        }
        let upstream = upstream_addr(upstream);
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("FaultProxy cannot listen on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("FaultProxy cannot read its listening address: {e}"));
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            state: Mutex::new(State {
                rules: rules
                    .into_iter()
                    .map(|rule| RuleState { rule, matched: 0, fired: 0 })
                    .collect(),
                requests: HashMap::new(),
                injected: HashMap::new(),
            }),
            sockets: Mutex::new(Sockets::default()),
            connections: Mutex::new(Vec::new()),
        });
        let accept = thread::Builder::new()
            .name("fault-proxy-accept".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || accept_loop(&listener, &shared)
            })
            .unwrap_or_else(|e| panic!("FaultProxy cannot start its accept thread: {e}"));
        FaultProxy { addr, shared, accept: Some(accept) }
    }

    /// The endpoint to give clients instead of the upstream's: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many faults were injected into requests whose `X-Amz-Target` ends with
    /// `target_suffix` (`""`: all faults).
    pub fn injected(&self, target_suffix: &str) -> u32 {
        sum_matching(&lock(&self.shared.state).injected, target_suffix)
    }

    /// How many requests whose `X-Amz-Target` ends with `target_suffix` arrived (injected or
    /// forwarded; `""`: all requests with the header), e.g. to check that a client retried.
    pub fn requests(&self, target_suffix: &str) -> u32 {
        sum_matching(&lock(&self.shared.state).requests, target_suffix)
    }

    /// How many requests were forwarded and answered by the upstream.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblock accept() with a connection of our own; without it the thread cannot be joined.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).is_ok();
        if let Some(accept) = self.accept.take()
            && woke
        {
            let _ = accept.join();
        }
        // Wake every connection thread blocked on a client or upstream socket.
        for socket in lock(&self.shared.sockets).open.values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for connection in connections {
            let _ = connection.join();
        }
    }
}

/// State shared by the proxy handle, the accept thread and the connection threads.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    forwarded: AtomicU64,
    /// Numbers the `x-amzn-RequestId` of injected responses.
    responses: AtomicU64,
    state: Mutex<State>,
    sockets: Mutex<Sockets>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
struct State {
    rules: Vec<RuleState>,
    /// Requests per full `X-Amz-Target` value.
    requests: HashMap<String, u32>,
    /// Injected faults per full `X-Amz-Target` value.
    injected: HashMap<String, u32>,
}

#[derive(Debug)]
struct RuleState {
    rule: Rule,
    /// Matching requests seen so far.
    matched: u32,
    /// Faults injected so far.
    fired: u32,
}

/// Clones of every open client and upstream socket, so that dropping the proxy can shut them down.
#[derive(Debug, Default)]
struct Sockets {
    next_id: u64,
    open: HashMap<u64, TcpStream>,
}

impl Shared {
    /// Counts a request and returns the fault to inject, if a rule fires.
    fn decide(&self, target: Option<&str>) -> Option<Fault> {
        let target = target?;
        let state = &mut *lock(&self.state);
        *state.requests.entry(target.to_owned()).or_default() += 1;
        let mut chosen = None;
        for rule in &mut state.rules {
            if !target.ends_with(rule.rule.target_suffix) {
                continue;
            }
            rule.matched += 1;
            let exhausted = rule.rule.limit.is_some_and(|limit| rule.fired >= limit);
            if chosen.is_none() && !exhausted && rule.matched % rule.rule.every == 0 {
                rule.fired += 1;
                chosen = Some(rule.rule.fault);
            }
        }
        if chosen.is_some() {
            *state.injected.entry(target.to_owned()).or_default() += 1;
        }
        chosen
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Keeps a clone of a socket in [`Shared::sockets`]; dropping it shuts the socket down.
#[derive(Debug)]
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Registration {
    fn new(shared: &Arc<Shared>, stream: &TcpStream) -> io::Result<Registration> {
        let clone = stream.try_clone()?;
        let mut sockets = lock(&shared.sockets);
        let id = sockets.next_id;
        sockets.next_id += 1;
        sockets.open.insert(id, clone);
        Ok(Registration { shared: Arc::clone(shared), id })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let socket = lock(&self.shared.sockets).open.remove(&self.id);
        if let Some(socket) = socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sum_matching(counts: &HashMap<String, u32>, suffix: &str) -> u32 {
    counts.iter().filter(|(target, _)| target.ends_with(suffix)).map(|(_, count)| count).sum()
}

/// The socket address of `http://HOST:PORT`.
fn upstream_addr(upstream: &str) -> SocketAddr {
    let authority = upstream
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("FaultProxy upstream must be http://HOST:PORT, got {upstream:?}"))
        .trim_end_matches('/');
    authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("FaultProxy cannot resolve the upstream {upstream:?}"))
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            break;
        }
        let Ok((stream, _)) = accepted else {
            // For example too many open files: do not spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(registration) = Registration::new(shared, &stream) else { continue };
        let worker = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("fault-proxy-conn".into())
            .spawn(move || serve(&worker, stream, registration));
        if let Ok(handle) = spawned {
            let mut connections = lock(&shared.connections);
            connections.retain(|connection| !connection.is_finished());
            connections.push(handle);
        }
    }
}

/// Serves the requests of one client connection until it closes, fails or the proxy stops.
fn serve(shared: &Arc<Shared>, client: TcpStream, _registration: Registration) {
    let _ = client.set_read_timeout(Some(IO_TIMEOUT));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    let _ = client.set_nodelay(true);
    let mut client = BufReader::new(client);
    let mut upstream = None;
    while !shared.stopping() {
        match serve_one(shared, &mut client, &mut upstream) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
    }
    // Dropping `_registration` shuts the client connection down.
}

/// Reads one request and answers it; `Ok(true)` when the connection stays open.
fn serve_one(
    shared: &Arc<Shared>,
    client: &mut BufReader<TcpStream>,
    upstream: &mut Option<Upstream>,
) -> io::Result<bool> {
    let Some(head) = read_head(client)? else { return Ok(false) };
    if head.version() == "HTTP/1.1" && head.has_token("expect", "100-continue") {
        client.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let kind = head.request_body()?;
    let keep_alive = head.keep_alive();
    let head_request = head.start_line.split_whitespace().next() == Some("HEAD");
    let target = head.header("x-amz-target").map(str::to_owned);
    let mut request = head.raw;
    read_body(client, kind, &mut request)?;

    let fault = shared.decide(target.as_deref());
    let target = target.unwrap_or_default();
    let response = match fault {
        Some(Fault::Reset) => return Ok(false),
        Some(Fault::Throttle) => {
            let message = if target.starts_with("DynamoDB") {
                "The level of configured provisioned throughput for the table was exceeded \
                 (injected)"
            } else {
                "Rate exceeded for shard (injected)"
            };
            let error = "ProvisionedThroughputExceededException";
            error_response(shared, &target, "400 Bad Request", error, message, keep_alive)
        }
        Some(Fault::ServerError) => {
            let status = "500 Internal Server Error";
            error_response(shared, &target, status, "InternalFailure", "injected", keep_alive)
        }
        None => match forward(shared, upstream, &request, head_request) {
            Ok(response) => {
                shared.forwarded.fetch_add(1, Ordering::SeqCst);
                client.get_mut().write_all(&response.bytes)?;
                return Ok(keep_alive && response.client_may_continue);
            }
            Err(e) => {
                *upstream = None;
                let body = format!("FaultProxy: upstream {} failed: {e}", shared.upstream);
                let response = format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                client.get_mut().write_all(response.as_bytes())?;
                return Ok(false);
            }
        },
    };
    client.get_mut().write_all(&response)?;
    Ok(keep_alive)
}

/// An AWS JSON protocol error response: `Content-Type` 1.0 for DynamoDB, 1.1 otherwise.
fn error_response(
    shared: &Shared,
    target: &str,
    status: &str,
    error_type: &str,
    message: &str,
    keep_alive: bool,
) -> Vec<u8> {
    let content_type = if target.starts_with("DynamoDB") {
        "application/x-amz-json-1.0"
    } else {
        "application/x-amz-json-1.1"
    };
    let id = shared.responses.fetch_add(1, Ordering::SeqCst);
    let body = format!(r#"{{"__type":"{error_type}","message":"{message}"}}"#);
    let connection = if keep_alive { "" } else { "Connection: close\r\n" };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nx-amzn-ErrorType: {error_type}\r\n\
         x-amzn-RequestId: 00000000-0000-4000-8000-{id:012x}\r\nContent-Length: {}\r\n\
         {connection}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A connection to the upstream, owned by one client connection.
#[derive(Debug)]
struct Upstream {
    reader: BufReader<TcpStream>,
    last_used: Instant,
    _registration: Registration,
}

/// A complete upstream response.
#[derive(Debug)]
struct Response {
    /// Exactly as received (interim `1xx` responses left out).
    bytes: Vec<u8>,
    /// Whether the upstream connection can carry another request.
    upstream_reusable: bool,
    /// Whether the client connection can carry another request (false for a response whose body
    /// ends when the connection closes, or that says `Connection: close`).
    client_may_continue: bool,
}

impl Upstream {
    fn connect(shared: &Arc<Shared>) -> io::Result<Upstream> {
        let stream = TcpStream::connect_timeout(&shared.upstream, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let registration = Registration::new(shared, &stream)?;
        // Registered after the proxy began stopping: its sockets were already shut down.
        if shared.stopping() {
            return Err(io::Error::other("the proxy is stopping"));
        }
        Ok(Upstream {
            reader: BufReader::new(stream),
            last_used: Instant::now(),
            _registration: registration,
        })
    }

    /// Whether the idle connection still looks open (a peek that would block).
    fn reusable(&mut self) -> bool {
        if self.last_used.elapsed() > UPSTREAM_IDLE || !self.reader.buffer().is_empty() {
            return false;
        }
        let stream = self.reader.get_ref();
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut probe = [0; 1];
        let open =
            matches!(stream.peek(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        stream.set_nonblocking(false).is_ok() && open
    }

    /// Sends a request and reads the response. `Err((true, _))` when the upstream closed the
    /// connection before answering (so it did not process the request).
    fn exchange(
        &mut self,
        request: &[u8],
        head_request: bool,
    ) -> Result<Response, (bool, io::Error)> {
        let stream = self.reader.get_mut();
        stream.write_all(request).and_then(|()| stream.flush()).map_err(|e| (true, e))?;
        let response = read_response(&mut self.reader, head_request).map_err(|e| (false, e))?;
        self.last_used = Instant::now();
        response.ok_or_else(|| {
            (true, io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed the connection"))
        })
    }
}

/// Forwards a request over the client connection's upstream connection, opening it when needed
/// and once more when a reused connection turns out to be closed.
fn forward(
    shared: &Arc<Shared>,
    slot: &mut Option<Upstream>,
    request: &[u8],
    head_request: bool,
) -> io::Result<Response> {
    if slot.as_mut().is_some_and(|upstream| !upstream.reusable()) {
        *slot = None;
    }
    let reused = slot.is_some();
    let upstream = match slot {
        Some(upstream) => upstream,
        None => slot.insert(Upstream::connect(shared)?),
    };
    let response = match upstream.exchange(request, head_request) {
        Ok(response) => response,
        Err((true, _)) if reused => {
            *slot = None;
            let upstream = slot.insert(Upstream::connect(shared)?);
            upstream.exchange(request, head_request).map_err(|(_, e)| e)?
        }
        Err((_, e)) => return Err(e),
    };
    if !response.upstream_reusable {
        *slot = None;
    }
    Ok(response)
}

/// Reads a response, skipping interim `1xx` responses; `Ok(None)` when the connection was closed
/// before the first byte.
fn read_response(
    reader: &mut BufReader<TcpStream>,
    head_request: bool,
) -> io::Result<Option<Response>> {
    let mut interim = false;
    loop {
        let head = match read_head(reader)? {
            Some(head) => head,
            None if !interim => return Ok(None),
            None => return Err(eof("upstream closed the connection after an interim response")),
        };
        let status = head.status()?;
        if (100..200).contains(&status) && status != 101 {
            interim = true;
            continue;
        }
        let kind = if head_request || (100..200).contains(&status) || status == 204 || status == 304
        {
            BodyKind::Empty
        } else if head.is_chunked() {
            BodyKind::Chunked
        } else if let Some(length) = head.content_length()? {
            BodyKind::Length(length)
        } else {
            BodyKind::UntilClose
        };
        let until_close = matches!(kind, BodyKind::UntilClose);
        let keep_alive = head.keep_alive();
        let mut bytes = head.raw;
        read_body(reader, kind, &mut bytes)?;
        return Ok(Some(Response {
            bytes,
            upstream_reusable: keep_alive && !until_close,
            client_may_continue: keep_alive && !until_close,
        }));
    }
}

/// The start line and headers of a request or response.
#[derive(Debug)]
struct Head {
    /// The bytes as received, up to and including the empty line.
    raw: Vec<u8>,
    start_line: String,
    headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy)]
enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (in any of its lines) holds `token`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `HTTP/1.x` from a request line (last word) or a status line (first word).
    fn version(&self) -> &str {
        let mut words = self.start_line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.starts_with("HTTP/") { first } else { words.last().unwrap_or_default() }
    }

    fn status(&self) -> io::Result<u16> {
        self.start_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {:?}", self.start_line)))
    }

    fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.version() == "HTTP/1.1" || self.has_token("connection", "keep-alive")
    }

    fn is_chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| v.parse().map_err(|_| invalid(format!("bad Content-Length {v:?}"))))
            .transpose()
    }

    fn request_body(&self) -> io::Result<BodyKind> {
        Ok(if self.is_chunked() {
            BodyKind::Chunked
        } else {
            self.content_length()?.map_or(BodyKind::Empty, BodyKind::Length)
        })
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn eof(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, message)
}

/// Appends one line (with its line end) to `out` and returns it without the line end;
/// `Ok(None)` at the end of the stream.
fn read_line(reader: &mut BufReader<TcpStream>, out: &mut Vec<u8>) -> io::Result<Option<String>> {
    let start = out.len();
    let read = reader.by_ref().take(MAX_LINE).read_until(b'\n', out)?;
    if read == 0 {
        return Ok(None);
    }
    if !out.ends_with(b"\n") {
        return Err(invalid("line too long or cut off".to_owned()));
    }
    let line = String::from_utf8_lossy(&out[start..]);
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

/// Reads a start line and headers; `Ok(None)` when the connection closed (or was reset) before
/// the first byte.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let start_line = match read_line(reader, &mut raw) {
        Ok(Some(line)) if !line.is_empty() => line,
        Ok(Some(_)) => return Err(invalid("empty start line".to_owned())),
        Ok(None) => return Ok(None),
        Err(e)
            if raw.is_empty()
                && matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut raw)?.ok_or_else(|| eof("message head cut off"))?;
        if line.is_empty() {
            return Ok(Some(Head { raw, start_line, headers }));
        }
        if headers.len() == MAX_HEADERS {
            return Err(invalid("too many header lines".to_owned()));
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// Appends a body, framing included, to `out`.
fn read_body(
    reader: &mut BufReader<TcpStream>,
    kind: BodyKind,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match kind {
        BodyKind::Empty => Ok(()),
        BodyKind::Length(length) => {
            if length > MAX_BODY {
                return Err(invalid(format!("body of {length} bytes is too large")));
            }
            read_exactly(reader, length, out)
        }
        BodyKind::Chunked => read_chunked(reader, out),
        BodyKind::UntilClose => {
            reader.by_ref().take(MAX_BODY).read_to_end(out)?;
            Ok(())
        }
    }
}

fn read_exactly(
    reader: &mut BufReader<TcpStream>,
    length: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let read = reader.by_ref().take(length).read_to_end(out)?;
    if read as u64 == length { Ok(()) } else { Err(eof("body cut off")) }
}

/// Appends a chunked body (chunks, last chunk, trailers, final empty line) to `out`.
fn read_chunked(reader: &mut BufReader<TcpStream>, out: &mut Vec<u8>) -> io::Result<()> {
    let mut total = 0u64;
    loop {
        let line = read_line(reader, out)?.ok_or_else(|| eof("chunked body cut off"))?;
        let size = line.split_once(';').map_or(line.as_str(), |(size, _)| size).trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
        total = total.saturating_add(size);
        if total > MAX_BODY {
            return Err(invalid("chunked body is too large".to_owned()));
        }
        if size == 0 {
            for _ in 0..=MAX_HEADERS {
                let trailer = read_line(reader, out)?.ok_or_else(|| eof("trailers cut off"))?;
                if trailer.is_empty() {
                    return Ok(());
                }
            }
            return Err(invalid("too many trailer lines".to_owned()));
        }
        read_exactly(reader, size, out)?;
        let end = read_line(reader, out)?.ok_or_else(|| eof("chunk cut off"))?;
        if !end.is_empty() {
            return Err(invalid("chunk longer than its size".to_owned()));
        }
    }
}
