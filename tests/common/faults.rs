//! A fault-injecting HTTP/1.1 reverse proxy for the integration tests. It stands between the AWS
//! SDK clients and one emulator and answers chosen requests with throttling errors, server errors
//! or dropped connections, so tests can prove the host survives what the emulators never do.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "common/http_proxy.rs"]
//! mod http_proxy;
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
//!     vec![Rule {
//!         target_suffix: "GetRecords",
//!         every: 3,
//!         fault: Fault::Throttle,
//!         limit: Some(10),
//!         body_contains: None,
//!     }],
//! );
//! // ... AwsSettings { kinesis_endpoint: Some(kinesis.endpoint()), .. }
//! // ... run the host, check its output ...
//! assert!(kinesis.injected("GetRecords") > 0);
//! ```
//!
//! A rule matches a request when the request's `X-Amz-Target` header ends with the rule's
//! `target_suffix` (`Kinesis_20131202.GetRecords` ends with `GetRecords`; an empty suffix matches
//! every request that has the header) and, when the rule has `body_contains`, its body contains
//! that text. Every matching request counts for the rule, and the rule
//! fires on its `every`-th, `2 * every`-th, ... matching request until it has fired `limit` times.
//! Rules are tried in order and the first one that fires decides the fault; requests that no rule
//! fires for are forwarded unchanged, over one upstream connection per client connection.
//! [`FaultProxy::pause`] holds every request unanswered until it is cleared.
//!
//! The proxy listens on an OS-chosen port of 127.0.0.1 and stops (closing every connection it
//! holds) when the [`FaultProxy`] is dropped. Every read and write has a 30-second timeout, so no
//! thread waits forever. An upstream that fails (or a malformed upstream response) is answered
//! with `502 Bad Gateway` and the client connection is closed.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http_proxy::{
    BodyKind, Connections, Registration, Server, eof, lock, plain_response, read_body, read_head,
};

/// Upstream connections idle for longer are not reused (Node servers close idle ones after 5 s).
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);

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
    /// `400 Bad Request` with `InvalidArgumentException`, as Kinesis refuses a request holding
    /// an invalid record; the connection stays open.
    Invalid,
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
    /// Match only requests whose body contains this text (`None`: any body).
    pub body_contains: Option<&'static str>,
}

/// A running proxy; see the module documentation. Dropping it stops it.
#[derive(Debug)]
pub struct FaultProxy {
    server: Server,
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            upstream,
            forwarded: AtomicU64::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
            responses: AtomicU64::new(0),
            state: Mutex::new(State {
                rules: rules
                    .into_iter()
                    .map(|rule| RuleState { rule, matched: 0, fired: 0 })
                    .collect(),
                requests: HashMap::new(),
                injected: HashMap::new(),
            }),
        });
        let server = Server::start("FaultProxy", {
            let shared = Arc::clone(&shared);
            move |connections, client| serve(&shared, connections, client)
        });
        FaultProxy { server, shared }
    }

    /// The endpoint to give clients instead of the upstream's: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr())
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

    /// Holds every request unanswered while `paused` (for at most two minutes each), as a
    /// server that stopped answering; clearing it lets the held requests through.
    pub fn pause(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }

    /// How many requests were forwarded and answered by the upstream.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

/// State shared by the proxy handle and the connection threads.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    forwarded: AtomicU64,
    /// While set, requests are held unanswered, as by a server that stopped responding.
    paused: std::sync::atomic::AtomicBool,
    /// Numbers the `x-amzn-RequestId` of injected responses.
    responses: AtomicU64,
    state: Mutex<State>,
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

impl Shared {
    /// Counts a request and returns the fault to inject, if a rule fires.
    fn decide(&self, target: Option<&str>, body: &[u8]) -> Option<Fault> {
        let target = target?;
        let state = &mut *lock(&self.state);
        *state.requests.entry(target.to_owned()).or_default() += 1;
        let mut chosen = None;
        for rule in &mut state.rules {
            if !target.ends_with(rule.rule.target_suffix) {
                continue;
            }
            if let Some(text) = rule.rule.body_contains
                && !body.windows(text.len()).any(|w| w == text.as_bytes())
            {
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

/// Serves the requests of one client connection until it closes, fails or the proxy stops.
fn serve(shared: &Shared, connections: &Arc<Connections>, client: TcpStream) {
    let mut client = BufReader::new(client);
    let mut upstream = None;
    while !connections.stopping() {
        match serve_one(shared, connections, &mut client, &mut upstream) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
    }
}

/// Reads one request and answers it; `Ok(true)` when the connection stays open.
fn serve_one(
    shared: &Shared,
    connections: &Arc<Connections>,
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

    let held_since = Instant::now();
    while shared.paused.load(Ordering::SeqCst)
        && !connections.stopping()
        && held_since.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let fault = shared.decide(target.as_deref(), &request);
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
        Some(Fault::Invalid) => {
            let (status, error) = ("400 Bad Request", "InvalidArgumentException");
            error_response(
                shared,
                &target,
                status,
                error,
                "a record is invalid (injected)",
                keep_alive,
            )
        }
        Some(Fault::ServerError) => {
            let status = "500 Internal Server Error";
            error_response(shared, &target, status, "InternalFailure", "injected", keep_alive)
        }
        None => match forward(shared, connections, upstream, &request, head_request) {
            Ok(response) => {
                shared.forwarded.fetch_add(1, Ordering::SeqCst);
                client.get_mut().write_all(&response.bytes)?;
                return Ok(keep_alive && response.client_may_continue);
            }
            Err(e) => {
                *upstream = None;
                let body = format!("FaultProxy: upstream {} failed: {e}", shared.upstream);
                let response = plain_response("502 Bad Gateway", &body);
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
    fn connect(shared: &Shared, connections: &Arc<Connections>) -> io::Result<Upstream> {
        let (stream, registration) = connections.connect(&shared.upstream)?;
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
    shared: &Shared,
    connections: &Arc<Connections>,
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
        None => slot.insert(Upstream::connect(shared, connections)?),
    };
    let response = match upstream.exchange(request, head_request) {
        Ok(response) => response,
        Err((true, _)) if reused => {
            *slot = None;
            let upstream = slot.insert(Upstream::connect(shared, connections)?);
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
