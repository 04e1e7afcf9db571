//! A forward HTTP/1.1 proxy for the integration tests, to prove that a client really goes through
//! the proxy it was configured with: it counts every request it forwards, per upstream and
//! `X-Amz-Target`.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "common/http_proxy.rs"]
//! mod http_proxy;
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
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::http_proxy::{Connections, Head, MAX_BODY, Server, lock, plain_response, read_head};
/// Request headers about the hop to the proxy, not sent on.
const HOP_HEADERS: &[&str] =
    &["connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "upgrade"];

/// A running proxy; see the module documentation. Dropping it stops it.
#[derive(Debug)]
pub struct ForwardProxy {
    server: Server,
    shared: Arc<Shared>,
}

impl ForwardProxy {
    /// Starts a proxy on a free port of 127.0.0.1.
    ///
    /// # Panics
    ///
    /// If the proxy cannot listen or start its thread.
    #[must_use = "the proxy stops when it is dropped"]
    pub fn start() -> ForwardProxy {
        let shared = Arc::new(Shared::default());
        let server = Server::start("ForwardProxy", {
            let shared = Arc::clone(&shared);
            move |connections, client| serve(&shared, connections, client)
        });
        ForwardProxy { server, shared }
    }

    /// The port to give clients as their proxy port (the host is `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.server.addr().port()
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

/// State shared by the proxy handle and the connection threads.
#[derive(Debug, Default)]
struct Shared {
    refused: AtomicU64,
    /// Forwarded requests per (upstream `host:port`, `X-Amz-Target` or `""`).
    forwarded: Mutex<HashMap<(String, String), u64>>,
}

/// Why a request is not forwarded: the status line and a reason for the body.
type Refusal = (&'static str, String);

/// Serves one request of one client connection, then closes it.
fn serve(shared: &Shared, connections: &Arc<Connections>, client: TcpStream) {
    let mut client = BufReader::new(client);
    let result = match read_request(&mut client) {
        Ok(None) => return,
        Ok(Some(Ok(request))) => forward(shared, connections, &mut client, &request),
        Ok(Some(Err(refusal))) => Err(refusal),
        Err(e) => Err(("400 Bad Request", format!("unreadable request: {e}"))),
    };
    if let Err((status, reason)) = result {
        if !status.starts_with("502") {
            shared.refused.fetch_add(1, Ordering::SeqCst);
        }
        let response = plain_response(status, &format!("ForwardProxy: {reason}"));
        let _ = client.get_mut().write_all(response.as_bytes());
    }
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
    let Some(Head { start_line, headers, .. }) = read_head(client)? else { return Ok(None) };
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
    shared: &Shared,
    connections: &Arc<Connections>,
    client: &mut BufReader<TcpStream>,
    request: &Request,
) -> Result<(), Refusal> {
    let bad_gateway =
        |e: io::Error| ("502 Bad Gateway", format!("upstream {}: {e}", request.authority));
    let (upstream, _registration) = connections.connect(&request.upstream).map_err(bad_gateway)?;
    let mut upstream = BufReader::new(upstream);
    upstream.get_mut().write_all(&request.bytes).map_err(bad_gateway)?;
    let Head { start_line: status_line, headers, .. } = read_head(&mut upstream)
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
