//! A forward HTTP/1.1 proxy for the integration tests, to prove that a client really goes through
//! the proxy it was configured with: it counts every request it forwards, per upstream and
//! `X-Amz-Target`.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "common/forward_proxy.rs"]
//! mod forward_proxy;
//! ```
//!
//! and give clients `127.0.0.1` and [`ForwardProxy::port`] as their HTTP proxy:
//!
//! ```ignore
//! let proxy = forward_proxy::ForwardProxy::start();
//! // ... ProxyHost=127.0.0.1, ProxyPort={proxy.port()}, endpoint http://kinesis.invalid:PORT ...
//! assert!(proxy.requests("kinesis.invalid:PORT", "GetRecords") > 0);
//! ```
//!
//! Clients send a plain-HTTP request to a proxy in absolute form
//! (`POST http://127.0.0.1:4567/ HTTP/1.1`). The proxy connects to that host and port, sends the
//! request on in origin form (`POST / HTTP/1.1`) and relays the response. It serves one request
//! per connection (both sides are told `Connection: close`), which keeps it simple and is allowed
//! to any proxy.
//!
//! It resolves every host name in the reserved `.invalid` domain (RFC 2606) to 127.0.0.1, so an
//! endpoint such as `http://kinesis.invalid:4567` works only through the proxy: a client that
//! ignored its proxy settings could not even resolve it. It reaches loopback addresses only: any
//! other upstream is answered with `403 Forbidden`, and `CONNECT` (tunnels, for `https://`), a
//! request target that is not `http://…` and chunked request bodies with `501 Not Implemented`.
//! An upstream that cannot be reached is answered with `502 Bad Gateway`.
//!
//! The proxy listens on an OS-chosen port of 127.0.0.1 and stops (closing every connection it
//! holds) when the [`ForwardProxy`] is dropped. Every read and write has a 30-second timeout, so
//! no thread waits forever.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Timeout of every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest accepted line of a message head.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines accepted in one message head.
const MAX_HEADERS: usize = 200;
/// Largest relayed message body (GetRecords responses can reach about 14 MiB).
const MAX_BODY: u64 = 256 * 1024 * 1024;
/// Request headers about the hop to the proxy, not sent on.
const HOP_HEADERS: &[&str] =
    &["connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "upgrade"];

/// A running proxy; see the module documentation. Dropping it stops it.
#[derive(Debug)]
pub struct ForwardProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ForwardProxy {
    /// Starts a proxy on a free port of 127.0.0.1.
    ///
    /// # Panics
    ///
    /// If the proxy cannot listen or start its thread.
    #[must_use = "the proxy stops when it is dropped"]
    pub fn start() -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("ForwardProxy cannot listen on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("ForwardProxy cannot read its listening address: {e}"));
        let shared = Arc::new(Shared::default());
        let accept = thread::Builder::new()
            .name("forward-proxy-accept".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || accept_loop(&listener, &shared)
            })
            .unwrap_or_else(|e| panic!("ForwardProxy cannot start its accept thread: {e}"));
        ForwardProxy { addr, shared, accept: Some(accept) }
    }

    /// The port to give clients as their proxy port (the host is `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many requests to `upstream` (`"http://HOST:PORT"` or `"HOST:PORT"`, as in the request
    /// targets) whose `X-Amz-Target` ends with `target_suffix` (`""`: every request, with the
    /// header or not) were forwarded and answered.
    pub fn requests(&self, upstream: &str, target_suffix: &str) -> u64 {
        let upstream = upstream.strip_prefix("http://").unwrap_or(upstream).trim_end_matches('/');
        lock(&self.shared.forwarded)
            .iter()
            .filter(|((authority, target), _)| {
                authority.eq_ignore_ascii_case(upstream) && target.ends_with(target_suffix)
            })
            .map(|(_, count)| count)
            .sum()
    }

    /// How many requests were refused (not loopback, not `http://`, `CONNECT`, malformed).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for ForwardProxy {
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
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    refused: AtomicU64,
    /// Forwarded requests per (upstream `host:port`, `X-Amz-Target` or `""`).
    forwarded: Mutex<HashMap<(String, String), u64>>,
    sockets: Mutex<Sockets>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Clones of every open client and upstream socket, so that dropping the proxy can shut them down.
#[derive(Debug, Default)]
struct Sockets {
    next_id: u64,
    open: HashMap<u64, TcpStream>,
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
            .name("forward-proxy-conn".into())
            .spawn(move || serve(&worker, stream, registration));
        if let Ok(handle) = spawned {
            let mut connections = lock(&shared.connections);
            connections.retain(|connection| !connection.is_finished());
            connections.push(handle);
        }
    }
}

/// Why a request is not forwarded: the status line and a reason for the body.
type Refusal = (&'static str, String);

/// Serves one request of one client connection, then closes it.
fn serve(shared: &Arc<Shared>, client: TcpStream, _registration: Registration) {
    let _ = client.set_read_timeout(Some(IO_TIMEOUT));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    let _ = client.set_nodelay(true);
    let mut client = BufReader::new(client);
    let result = match read_request(&mut client) {
        Ok(None) => return,
        Ok(Some(Ok(request))) => forward(shared, &mut client, &request),
        Ok(Some(Err(refusal))) => Err(refusal),
        Err(e) => Err(("400 Bad Request", format!("unreadable request: {e}"))),
    };
    if let Err((status, reason)) = result {
        if !status.starts_with("502") {
            shared.refused.fetch_add(1, Ordering::SeqCst);
        }
        let body = format!("ForwardProxy: {reason}");
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.get_mut().write_all(response.as_bytes());
    }
    // Dropping `_registration` shuts the client connection down.
}

/// A request to forward.
#[derive(Debug)]
struct Request {
    /// `host:port` as in the request target.
    authority: String,
    upstream: SocketAddr,
    target: String,
    /// In origin form, with `Connection: close`, body included.
    bytes: Vec<u8>,
}

/// Reads one request in absolute form and rewrites it to origin form; `Ok(None)` when the
/// connection closed before the first byte.
fn read_request(client: &mut BufReader<TcpStream>) -> io::Result<Option<Result<Request, Refusal>>> {
    let Some(Head { start_line, headers }) = read_head(client)? else { return Ok(None) };
    let mut words = start_line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Ok(Some(Err(("400 Bad Request", format!("bad request line {start_line:?}")))));
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        return Ok(Some(Err(("501 Not Implemented", "no CONNECT tunnels".to_owned()))));
    }
    let Some(rest) =
        target.get(..7).filter(|s| s.eq_ignore_ascii_case("http://")).map(|_| &target[7..])
    else {
        return Ok(Some(Err((
            "501 Not Implemented",
            format!("request target {target:?} is not an absolute http:// URL"),
        ))));
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let upstream = match loopback(authority) {
        Ok(upstream) => upstream,
        Err(reason) => return Ok(Some(Err(("403 Forbidden", reason)))),
    };
    let header = |name: &str| {
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    };
    if header("transfer-encoding").is_some() {
        return Ok(Some(Err(("501 Not Implemented", "no chunked request bodies".to_owned()))));
    }
    let length: u64 = match header("content-length").map(str::parse).transpose() {
        Ok(length) => length.unwrap_or(0),
        Err(_) => return Ok(Some(Err(("400 Bad Request", "bad Content-Length".to_owned())))),
    };
    if length > MAX_BODY {
        return Ok(Some(Err(("413 Content Too Large", format!("{length} bytes")))));
    }
    let mut bytes = format!("{method} {path} {version}\r\n").into_bytes();
    for (name, value) in &headers {
        if !HOP_HEADERS.iter().any(|hop| name.eq_ignore_ascii_case(hop)) {
            bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    bytes.extend_from_slice(b"Connection: close\r\n\r\n");
    let read = client.by_ref().take(length).read_to_end(&mut bytes)?;
    if read as u64 != length {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request body cut off"));
    }
    Ok(Some(Ok(Request {
        authority: authority.to_owned(),
        upstream,
        target: header("x-amz-target").unwrap_or_default().to_owned(),
        bytes,
    })))
}

/// The address of `host:port` when every address it names is a loopback one; a host in `.invalid`
/// names 127.0.0.1.
fn loopback(authority: &str) -> Result<SocketAddr, String> {
    let resolvable = match authority.rsplit_once(':') {
        Some((host, port)) if host.to_ascii_lowercase().ends_with(".invalid") => {
            format!("127.0.0.1:{port}")
        }
        _ => authority.to_owned(),
    };
    let addrs: Vec<SocketAddr> = resolvable
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
        .collect();
    match addrs.first() {
        Some(first) if addrs.iter().all(|a| a.ip().is_loopback()) => Ok(*first),
        Some(_) => Err(format!("{authority} is not a loopback address; refused")),
        None => Err(format!("{authority:?} names no address")),
    }
}

/// Sends the request upstream and relays the response, with `Connection: close`, to the client.
fn forward(
    shared: &Arc<Shared>,
    client: &mut BufReader<TcpStream>,
    request: &Request,
) -> Result<(), Refusal> {
    let bad_gateway =
        |e: io::Error| ("502 Bad Gateway", format!("upstream {}: {e}", request.authority));
    let upstream =
        TcpStream::connect_timeout(&request.upstream, IO_TIMEOUT).map_err(bad_gateway)?;
    let _registration = Registration::new(shared, &upstream).map_err(bad_gateway)?;
    if shared.stopping() {
        return Err(bad_gateway(io::Error::other("the proxy is stopping")));
    }
    upstream.set_read_timeout(Some(IO_TIMEOUT)).map_err(bad_gateway)?;
    upstream.set_write_timeout(Some(IO_TIMEOUT)).map_err(bad_gateway)?;
    let mut upstream = BufReader::new(upstream);
    upstream.get_mut().write_all(&request.bytes).map_err(bad_gateway)?;
    let Head { start_line: status_line, headers } = read_head(&mut upstream)
        .map_err(bad_gateway)?
        .ok_or_else(|| bad_gateway(io::Error::other("closed without a response")))?;
    let mut head = format!("{status_line}\r\n");
    let mut length = None;
    for (name, value) in &headers {
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<u64>().ok();
        }
        if !name.eq_ignore_ascii_case("connection") && !name.eq_ignore_ascii_case("keep-alive") {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    // From here on the response has begun: a failure can only cut it off.
    *lock(&shared.forwarded)
        .entry((request.authority.clone(), request.target.clone()))
        .or_default() += 1;
    let client = client.get_mut();
    if client.write_all(head.as_bytes()).is_ok() {
        // The body: by its length, or (chunked or unframed) up to the upstream's close.
        let _ = io::copy(&mut upstream.by_ref().take(length.unwrap_or(MAX_BODY)), client);
        let _ = client.flush();
    }
    Ok(())
}

/// The start line and header lines (name, value) of a message.
#[derive(Debug)]
struct Head {
    start_line: String,
    headers: Vec<(String, String)>,
}

/// Reads a start line and header lines; `Ok(None)` when the connection closed (or was reset)
/// before the first byte.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
    let mut lines = Vec::new();
    loop {
        let mut raw = Vec::new();
        let read = match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut raw) {
            Ok(read) => read,
            Err(e)
                if lines.is_empty()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if read == 0 && lines.is_empty() {
            return Ok(None);
        }
        if !raw.ends_with(b"\n") {
            return Err(invalid("line too long or cut off".to_owned()));
        }
        let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() && lines.is_empty() {
            return Err(invalid("empty start line".to_owned()));
        }
        if line.is_empty() {
            break;
        }
        if lines.len() > MAX_HEADERS {
            return Err(invalid("too many header lines".to_owned()));
        }
        lines.push(line);
    }
    let start_line = lines.remove(0);
    let headers = lines
        .into_iter()
        .map(|line| {
            let (name, value) =
                line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect::<io::Result<_>>()?;
    Ok(Some(Head { start_line, headers }))
}
