//! The origin server (httpterm style): `GET /?s=SIZE` returns exactly SIZE
//! bytes of a fixed pattern with a correct `Content-Length`. HTTP/1.0 and
//! 1.1, `Connection: close` and keep-alive. One listener per thread bound
//! with `SO_REUSEPORT`, each thread running its own current-thread tokio
//! runtime; complete responses (head and body) are prepared once per thread
//! and size and written with one call. Counts connections accepted and
//! requests served, per thread, without shared cache lines.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http1::{self, HeadError};
use crate::size::{self, SizeLabel};

/// Largest object the origin serves (64 MiB): responses are held in memory.
pub const MAX_OBJECT: u64 = 64 << 20;

/// Prepared responses kept per thread; past that, responses are built per
/// request.
const CACHE_ENTRIES: usize = 256;

/// The 64-byte pattern bodies repeat: byte `i` of every body is
/// `PATTERN[i % 64]`.
pub const PATTERN: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\n";

/// Byte `i` of any body the origin serves.
pub fn body_byte(i: u64) -> u8 {
    PATTERN[(i % 64) as usize]
}

/// Why the origin could not start.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start origin thread: {0}")]
    Thread(io::Error),
    #[error("origin threads must be at least 1")]
    NoThreads,
}

/// How to run the origin.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Address to listen on; port 0 picks a free port (see
    /// [`Origin::local_addr`]).
    pub listen: SocketAddr,
    /// Listener threads (one `SO_REUSEPORT` socket and runtime each).
    pub threads: usize,
    /// `listen(2)` backlog per socket.
    pub backlog: i32,
}

impl OriginConfig {
    pub fn new(listen: SocketAddr, threads: usize) -> Self {
        Self {
            listen,
            threads,
            backlog: 4096,
        }
    }
}

/// What the origin has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OriginStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests answered with a 4xx.
    pub bad_requests: u64,
    /// Body bytes sent.
    pub body_bytes: u64,
}

#[derive(Default)]
#[repr(align(128))]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    bad_requests: AtomicU64,
    body_bytes: AtomicU64,
}

/// A running origin. Dropping it stops the threads.
pub struct Origin {
    addr: SocketAddr,
    counters: Arc<Vec<Counters>>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

fn bind(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

impl Origin {
    /// Binds every listener (so address errors surface here), then starts
    /// the threads.
    pub fn start(config: &OriginConfig) -> Result<Self, OriginError> {
        if config.threads == 0 {
            return Err(OriginError::NoThreads);
        }
        let listen_err = |addr, source| OriginError::Listen { addr, source };
        // SO_REUSEPORT would let us share a port with another origin of the
        // same user and silently split its traffic: first check that the
        // port is free with a plain bind (which also resolves port 0).
        let addr = std::net::TcpListener::bind(config.listen)
            .and_then(|probe| probe.local_addr())
            .map_err(|e| listen_err(config.listen, e))?;
        let mut listeners = Vec::with_capacity(config.threads);
        for _ in 0..config.threads {
            listeners.push(bind(addr, config.backlog).map_err(|e| listen_err(addr, e))?);
        }
        let counters: Arc<Vec<Counters>> =
            Arc::new((0..config.threads).map(|_| Counters::default()).collect());
        let (shutdown, rx) = watch::channel(false);
        let mut threads = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let counters = Arc::clone(&counters);
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("origin-{i}"))
                .spawn(move || run_thread(listener, counters, i, rx))
                .map_err(OriginError::Thread)?;
            threads.push(handle);
        }
        Ok(Self {
            addr,
            counters,
            shutdown,
            threads,
        })
    }

    /// The address the origin listens on (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Totals over all threads.
    pub fn stats(&self) -> OriginStats {
        let mut s = OriginStats::default();
        for c in self.counters.iter() {
            s.connections += c.connections.load(Relaxed);
            s.requests += c.requests.load(Relaxed);
            s.bad_requests += c.bad_requests.load(Relaxed);
            s.body_bytes += c.body_bytes.load(Relaxed);
        }
        s
    }

    /// Stops the threads (open connections are dropped) and returns the
    /// final totals.
    pub fn stop(mut self) -> OriginStats {
        self.stop_threads();
        self.stats()
    }

    fn stop_threads(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn run_thread(
    listener: std::net::TcpListener,
    counters: Arc<Vec<Counters>>,
    index: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("origin thread {index}: cannot build runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("origin thread {index}: {e}");
                return;
            }
        };
        let cache = Rc::new(RefCell::new(ResponseCache::default()));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        counters[index].connections.fetch_add(1, Relaxed);
                        let counters = Arc::clone(&counters);
                        let cache = Rc::clone(&cache);
                        tokio::task::spawn_local(async move {
                            let _ = serve(stream, &counters[index], &cache).await;
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        log::warn!("origin accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        }
    });
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ResponseKey {
    size: u64,
    minor: u8,
    keep_alive: bool,
    head_only: bool,
}

#[derive(Default)]
struct ResponseCache {
    map: HashMap<ResponseKey, Rc<[u8]>>,
}

impl ResponseCache {
    fn get(&mut self, key: ResponseKey) -> Rc<[u8]> {
        if let Some(r) = self.map.get(&key) {
            return Rc::clone(r);
        }
        let r: Rc<[u8]> = build_ok(key).into();
        if self.map.len() < CACHE_ENTRIES {
            self.map.insert(key, Rc::clone(&r));
        }
        r
    }
}

fn build_ok(key: ResponseKey) -> Vec<u8> {
    let head = format!(
        "HTTP/1.{} 200 OK\r\nServer: hvprof-origin\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        key.minor,
        key.size,
        if key.keep_alive {
            "keep-alive"
        } else {
            "close"
        }
    );
    let body_len = if key.head_only { 0 } else { key.size as usize };
    let mut out = Vec::with_capacity(head.len() + body_len);
    out.extend_from_slice(head.as_bytes());
    out.extend((0..body_len as u64).map(body_byte));
    out
}

fn build_error(status: u16, reason: &str, minor: u8, message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    format!(
        "HTTP/1.{minor} {status} {reason}\r\nServer: hvprof-origin\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What a request asks for.
enum Route {
    Object(u64),
    Error(u16, &'static str, String),
}

fn route(method: &[u8], target: &[u8]) -> Route {
    if method != b"GET" && method != b"HEAD" {
        return Route::Error(
            405,
            "Method Not Allowed",
            "only GET and HEAD are served".into(),
        );
    }
    let target = String::from_utf8_lossy(target);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if path != "/" {
        return Route::Error(
            400,
            "Bad Request",
            format!("unknown path '{path}': use GET /?s=SIZE"),
        );
    }
    let Some(value) = query.split('&').find_map(|kv| kv.strip_prefix("s=")) else {
        return Route::Error(
            400,
            "Bad Request",
            "missing size: use GET /?s=SIZE (e.g. /?s=64k)".into(),
        );
    };
    match size::parse_size(value) {
        Ok(n) if n <= MAX_OBJECT => Route::Object(n),
        Ok(_) => Route::Error(
            400,
            "Bad Request",
            format!(
                "size '{value}' is larger than the origin's limit of {}",
                SizeLabel(MAX_OBJECT)
            ),
        ),
        Err(e) => Route::Error(400, "Bad Request", e.to_string()),
    }
}

async fn serve(
    mut stream: TcpStream,
    counters: &Counters,
    cache: &RefCell<ResponseCache>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut filled = 0usize;
    loop {
        // Read until a complete head is buffered.
        let (response, keep_alive, consumed, body_len, bad) = loop {
            match http1::parse_request(&buf[..filled]) {
                Ok(Some(head)) => {
                    if head.framing.chunked {
                        let r = build_error(
                            400,
                            "Bad Request",
                            head.minor,
                            "chunked request bodies are not supported",
                        );
                        break (Rc::from(r), false, head.len, 0, true);
                    }
                    let body = head.framing.content_length.unwrap_or(0);
                    let keep_alive = head.keep_alive();
                    match route(head.method, head.target) {
                        Route::Object(size) => {
                            let key = ResponseKey {
                                size,
                                minor: head.minor,
                                keep_alive,
                                head_only: head.method == b"HEAD",
                            };
                            let r = cache.borrow_mut().get(key);
                            let sent = if key.head_only { 0 } else { size };
                            counters.body_bytes.fetch_add(sent, Relaxed);
                            break (r, keep_alive, head.len, body, false);
                        }
                        Route::Error(status, reason, msg) => {
                            break (
                                Rc::from(build_error(status, reason, head.minor, &msg)),
                                false,
                                head.len,
                                body,
                                true,
                            );
                        }
                    }
                }
                Ok(None) => {
                    if filled == buf.len() {
                        buf.resize((buf.len() * 2).min(http1::MAX_HEAD + 1024), 0);
                    }
                    let n = stream.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    filled += n;
                }
                Err(e) => {
                    let msg = match e {
                        HeadError::TooLarge => "request head too large".to_string(),
                        other => format!("malformed request: {other}"),
                    };
                    break (
                        Rc::from(build_error(400, "Bad Request", 1, &msg)),
                        false,
                        filled,
                        0,
                        true,
                    );
                }
            }
        };
        counters.requests.fetch_add(1, Relaxed);
        if bad {
            counters.bad_requests.fetch_add(1, Relaxed);
        }
        // Skip the head and any request body before answering, so that a
        // close never leaves unread bytes behind (which would turn the FIN
        // into a RST).
        let mut to_skip = consumed as u64 + body_len;
        loop {
            let take = to_skip.min(filled as u64) as usize;
            buf.copy_within(take..filled, 0);
            filled -= take;
            to_skip -= take as u64;
            if to_skip == 0 {
                break;
            }
            let n = stream.read(&mut buf[..]).await?;
            if n == 0 {
                return Ok(());
            }
            filled = n;
        }
        stream.write_all(&response).await?;
        if !keep_alive {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route(b"GET", b"/?s=1k"), Route::Object(1024)));
        assert!(matches!(route(b"HEAD", b"/?x=1&s=0"), Route::Object(0)));
        assert!(matches!(route(b"GET", b"/foo?s=1"), Route::Error(400, ..)));
        assert!(matches!(route(b"GET", b"/?s=1q"), Route::Error(400, ..)));
        assert!(matches!(route(b"GET", b"/"), Route::Error(400, ..)));
        assert!(matches!(route(b"POST", b"/?s=1"), Route::Error(405, ..)));
        assert!(matches!(route(b"GET", b"/?s=65m"), Route::Error(400, ..)));
    }

    #[test]
    fn prepared_response_is_exact() {
        let r = build_ok(ResponseKey {
            size: 130,
            minor: 1,
            keep_alive: false,
            head_only: false,
        });
        let head = http1::parse_response(&r).unwrap().unwrap();
        assert_eq!(head.framing.content_length, Some(130));
        let body = &r[head.len..];
        assert_eq!(body.len(), 130);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, &b)| b == body_byte(i as u64))
        );
    }
}
