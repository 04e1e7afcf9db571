//! What the two test proxies (`faults.rs`, `forward_proxy.rs`) share: a threaded server on a free
//! port of 127.0.0.1 that closes every connection it holds when it is dropped, and HTTP/1.1
//! messages read by hand, within limits.
//!
//! The proxies read HTTP themselves rather than through hyper's server: hyper 1 is in the tree
//! without its `server` feature, and turning it on in dev-dependencies would change the features
//! of hyper and of the AWS SDK built on it, so a test build and a build of the host binary alone
//! (without dev-dependencies) would each compile the SDK.
//! A test file that includes a proxy includes this module beside it:
//!
//! ```ignore
//! #[path = "common/http_proxy.rs"]
//! mod http_proxy;
//! ```

#![allow(dead_code)] // each proxy uses its own subset

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Timeout of every connect, read and write on client and upstream connections.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest accepted line of a message head or of chunked framing.
pub const MAX_LINE: u64 = 16 * 1024;
/// Most header lines (and chunked trailer lines) accepted in one message.
pub const MAX_HEADERS: usize = 200;
/// Largest accepted message body (GetRecords responses can reach about 14 MiB).
pub const MAX_BODY: u64 = 256 * 1024 * 1024;

/// A listening proxy: every accepted connection is served on a thread of its own. Dropping it
/// stops accepting, shuts every registered socket down and joins the threads.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    connections: Arc<Connections>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on a free port of 127.0.0.1 and serves each client connection (read and write
    /// timeouts set, registered so that dropping the server shuts it down) with `serve`. `name`
    /// names the proxy in panics and thread names.
    ///
    /// # Panics
    ///
    /// If the proxy cannot listen or start its thread.
    pub fn start<F>(name: &'static str, serve: F) -> Server
    where
        F: Fn(&Arc<Connections>, TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("{name} cannot listen on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{name} cannot read its listening address: {e}"));
        let connections = Arc::new(Connections::default());
        let accept = thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn({
                let connections = Arc::clone(&connections);
                move || accept_loop(name, &listener, &connections, Arc::new(serve))
            })
            .unwrap_or_else(|e| panic!("{name} cannot start its accept thread: {e}"));
        Server { addr, connections, accept: Some(accept) }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.connections.stop.store(true, Ordering::SeqCst);
        // Unblock accept() with a connection of our own; without it the thread cannot be joined.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).is_ok();
        if let Some(accept) = self.accept.take()
            && woke
        {
            let _ = accept.join();
        }
        // Wake every connection thread blocked on a client or upstream socket.
        for socket in lock(&self.connections.sockets).open.values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.connections.threads));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// The open sockets and connection threads of a [`Server`].
#[derive(Debug, Default)]
pub struct Connections {
    stop: AtomicBool,
    sockets: Mutex<Sockets>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Clones of every open client and upstream socket, so that dropping the server can shut them
/// down.
#[derive(Debug, Default)]
struct Sockets {
    next_id: u64,
    open: HashMap<u64, TcpStream>,
}

impl Connections {
    /// Whether the server is being dropped.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Connects to `upstream` with the I/O timeouts, registered so that dropping the server shuts
    /// it down; the connection closes when the returned [`Registration`] is dropped.
    pub fn connect(
        self: &Arc<Self>,
        upstream: &SocketAddr,
    ) -> io::Result<(TcpStream, Registration)> {
        let stream = TcpStream::connect_timeout(upstream, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let registration = self.register(&stream)?;
        // Registered after the server began stopping: its sockets were already shut down.
        if self.stopping() {
            return Err(io::Error::other("the proxy is stopping"));
        }
        Ok((stream, registration))
    }

    fn register(self: &Arc<Self>, stream: &TcpStream) -> io::Result<Registration> {
        let clone = stream.try_clone()?;
        let mut sockets = lock(&self.sockets);
        let id = sockets.next_id;
        sockets.next_id += 1;
        sockets.open.insert(id, clone);
        Ok(Registration { connections: Arc::clone(self), id })
    }
}

/// Keeps a clone of a socket in its server's [`Connections`]; dropping it shuts the socket down.
#[derive(Debug)]
pub struct Registration {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let socket = lock(&self.connections.sockets).open.remove(&self.id);
        if let Some(socket) = socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// Locks `mutex`, also when a thread panicked while holding it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

type Serve = Arc<dyn Fn(&Arc<Connections>, TcpStream) + Send + Sync>;

fn accept_loop(name: &str, listener: &TcpListener, connections: &Arc<Connections>, serve: Serve) {
    loop {
        let accepted = listener.accept();
        if connections.stopping() {
            break;
        }
        let Ok((stream, _)) = accepted else {
            // For example too many open files: do not spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(registration) = connections.register(&stream) else { continue };
        let (worker, serve) = (Arc::clone(connections), Arc::clone(&serve));
        let spawned = thread::Builder::new().name(format!("{name}-conn")).spawn(move || {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            let _ = stream.set_nodelay(true);
            serve(&worker, stream);
            // Shuts the client connection down.
            drop(registration);
        });
        if let Ok(handle) = spawned {
            let mut threads = lock(&connections.threads);
            threads.retain(|thread| !thread.is_finished());
            threads.push(handle);
        }
    }
}

/// A complete `text/plain` response that closes the connection, for what a proxy says itself.
pub fn plain_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The start line and headers of a request or response.
#[derive(Debug)]
pub struct Head {
    /// The bytes as received, up to and including the empty line.
    pub raw: Vec<u8>,
    pub start_line: String,
    /// `(name, value)`, trimmed, in the order received.
    pub headers: Vec<(String, String)>,
}

/// How a message's body is framed.
#[derive(Debug, Clone, Copy)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Head {
    /// The value of the first header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (in any of its lines) holds `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `HTTP/1.x` from a request line (last word) or a status line (first word).
    pub fn version(&self) -> &str {
        let mut words = self.start_line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.starts_with("HTTP/") { first } else { words.last().unwrap_or_default() }
    }

    /// The status code of a status line.
    pub fn status(&self) -> io::Result<u16> {
        self.start_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {:?}", self.start_line)))
    }

    /// Whether the connection may carry another message after this one.
    pub fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.version() == "HTTP/1.1" || self.has_token("connection", "keep-alive")
    }

    pub fn is_chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    pub fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| v.parse().map_err(|_| invalid(format!("bad Content-Length {v:?}"))))
            .transpose()
    }

    /// How the body of a request with this head is framed.
    pub fn request_body(&self) -> io::Result<BodyKind> {
        Ok(if self.is_chunked() {
            BodyKind::Chunked
        } else {
            self.content_length()?.map_or(BodyKind::Empty, BodyKind::Length)
        })
    }
}

pub fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

pub fn eof(message: &str) -> io::Error {
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
pub fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
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
pub fn read_body(
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
