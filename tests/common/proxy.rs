//! A loopback TCP proxy in front of a registry that counts what really
//! crossed the wire: bytes from upstream to clients (headers included) and
//! the HTTP/1.1 requests clients sent (parsed from the client stream, so
//! keep-alive, bodies and chunked uploads are framed correctly).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request a client sent through the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    pub method: String,
    /// Request target as sent, e.g. `/v2/foo/blobs/sha256:...`.
    pub path: String,
    /// The `Range` header, if any (`bytes=0-99`).
    pub range: Option<String>,
    /// The `Content-Range` header, if any (a PATCH's `0-99`).
    pub content_range: Option<String>,
}

#[derive(Default)]
struct Stats {
    down: AtomicU64,
    up: AtomicU64,
    requests: Mutex<Vec<ProxyRequest>>,
    /// See [`CountingProxy::hold_after`].
    hold: Mutex<Option<(String, usize)>>,
    /// See [`CountingProxy::pause_down_at`].
    pause_down: Mutex<Option<u64>>,
    /// See [`CountingProxy::cut_down_at`].
    cut_down: Mutex<Option<u64>>,
}

pub struct CountingProxy {
    addr: String,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

/// A simulated wide-area link: each direction delivers bytes `delay`
/// after they were sent, and downstream bytes of all connections share
/// `rate` bytes per second (this kernel has no `tc netem`).
#[derive(Clone, Copy, Debug)]
pub struct Wan {
    pub delay: Duration,
    pub rate: u64,
}

impl Wan {
    /// 10 ms each way (a 20 ms round trip), 200 Mbit/s.
    pub fn typical() -> Wan {
        Wan {
            delay: Duration::from_millis(10),
            rate: 25_000_000,
        }
    }
}

/// Shared token bucket of the downstream direction.
struct Bucket {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Sleep until `n` bytes may go.
    fn take(&self, n: usize) {
        let wait = {
            let mut st = self.state.lock().unwrap();
            let now = Instant::now();
            // At most 64 KiB of burst.
            let burst = 65_536.0;
            st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate as f64).min(burst);
            st.1 = now;
            st.0 -= n as f64;
            (st.0 < 0.0).then(|| Duration::from_secs_f64(-st.0 / self.rate as f64))
        };
        if let Some(w) = wait {
            std::thread::sleep(w);
        }
    }
}

impl CountingProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> CountingProxy {
        Self::start_with(upstream, None)
    }

    /// Like [`start`](Self::start), across a simulated WAN link.
    pub fn start_wan(upstream: &str, wan: Wan) -> CountingProxy {
        Self::start_with(upstream, Some(wan))
    }

    fn start_with(upstream: &str, wan: Option<Wan>) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, up) = (stats.clone(), stop.clone(), upstream.to_string());
        let link = wan.map(|w| {
            let bucket = Bucket {
                rate: w.rate.max(1),
                state: Mutex::new((0.0, Instant::now())),
            };
            (w.delay, Arc::new(bucket))
        });
        std::thread::spawn(move || accept_loop(listener, &up, &st, &sp, link));
        CountingProxy { addr, stats, stop }
    }

    /// `127.0.0.1:PORT` to point clients at.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Bytes sent from upstream to clients since start or the last reset.
    pub fn bytes_down(&self) -> u64 {
        self.stats.down.load(Ordering::SeqCst)
    }

    /// Bytes sent from clients to upstream since start or the last reset.
    pub fn bytes_up(&self) -> u64 {
        self.stats.up.load(Ordering::SeqCst)
    }

    /// Requests seen since start or the last reset, in arrival order.
    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.stats.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.stats.requests.lock().unwrap().len()
    }

    /// From the request after the `n`th `method` one on, nothing more
    /// reaches upstream (the client waits for an answer that never comes)
    /// until [`Self::release`]. Clients send a chunked upload's PATCHes one
    /// at a time, so once the next one is held, upstream has answered
    /// exactly `n`: a registry killed then holds exactly their bytes.
    pub fn hold_after(&self, method: &str, n: usize) {
        *self.stats.hold.lock().unwrap() = Some((method.to_string(), n));
    }

    /// True once a request is being held back by [`Self::hold_after`].
    pub fn holding(&self) -> bool {
        self.stats.holding()
    }

    /// Forward everything again (requests held so far stay lost).
    pub fn release(&self) {
        *self.stats.hold.lock().unwrap() = None;
    }

    /// Once `n` bytes went down (to clients), send no more until
    /// [`Self::resume_down`]: a download held in the middle of its body.
    pub fn pause_down_at(&self, n: u64) {
        *self.stats.pause_down.lock().unwrap() = Some(n);
    }

    /// Once `n` bytes went down, close the connection that carries the
    /// next ones (once): a download broken off mid-body.
    pub fn cut_down_at(&self, n: u64) {
        *self.stats.cut_down.lock().unwrap() = Some(n);
    }

    pub fn resume_down(&self) {
        *self.stats.pause_down.lock().unwrap() = None;
    }

    /// Zeroes the byte counters and forgets the requests seen.
    pub fn reset(&self) {
        self.stats.down.store(0, Ordering::SeqCst);
        self.stats.up.store(0, Ordering::SeqCst);
        self.stats.requests.lock().unwrap().clear();
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

impl Stats {
    fn holding(&self) -> bool {
        let hold = self.hold.lock().unwrap();
        let Some((method, n)) = hold.as_ref() else {
            return false;
        };
        let requests = self.requests.lock().unwrap();
        requests.iter().filter(|r| &r.method == method).count() > *n
    }
}

type Link = Option<(Duration, Arc<Bucket>)>;

fn accept_loop(
    listener: TcpListener,
    upstream: &str,
    stats: &Arc<Stats>,
    stop: &AtomicBool,
    link: Link,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(upstream) else {
            continue; // dropping the client closes it: the client sees a reset
        };
        let (c2, s2) = match (client.try_clone(), server.try_clone()) {
            (Ok(c), Ok(s)) => (c, s),
            _ => continue,
        };
        let st = stats.clone();
        let (up, down) = match &link {
            Some((delay, bucket)) => (
                delayed(server, *delay, None),
                delayed(c2, *delay, Some(bucket.clone())),
            ),
            None => (Out::Direct(server), Out::Direct(c2)),
        };
        std::thread::spawn(move || pump_up(client, up, &st));
        let st = stats.clone();
        std::thread::spawn(move || pump(s2, down, &st));
    }
}

/// Where a pump writes: the socket itself, or a thread that delivers
/// each piece when the link would have.
enum Out {
    Direct(TcpStream),
    Delayed(std::sync::mpsc::Sender<(Instant, Vec<u8>)>),
}

impl Out {
    fn send(&mut self, data: &[u8]) -> bool {
        match self {
            Out::Direct(s) => s.write_all(data).is_ok(),
            Out::Delayed(tx) => tx.send((Instant::now(), data.to_vec())).is_ok(),
        }
    }

    fn close(self) {
        if let Out::Direct(s) = self {
            let _ = s.shutdown(Shutdown::Write);
        }
        // A delayed one closes when its queue drains.
    }
}

fn delayed(mut to: TcpStream, delay: Duration, bucket: Option<Arc<Bucket>>) -> Out {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (sent, data) in rx {
            if let Some(w) = (sent + delay).checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            if let Some(b) = &bucket {
                b.take(data.len());
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    Out::Delayed(tx)
}

/// Upstream to client, counting.
fn pump(mut from: TcpStream, mut to: Out, stats: &Stats) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Within a paused budget, read no more than it allows: a share of
        // it is claimed (counted as sent) before the read, the unused rest
        // given back after, so connections together never exceed it.
        // Unpaused, bytes are counted once read.
        let claimed = match *stats.pause_down.lock().unwrap() {
            Some(at) => {
                let room = at.saturating_sub(stats.down.load(Ordering::SeqCst));
                let want = room.min(buf.len() as u64);
                stats.down.fetch_add(want, Ordering::SeqCst);
                Some(want as usize)
            }
            None => None,
        };
        if claimed == Some(0) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let want = claimed.unwrap_or(buf.len());
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let unused = if claimed.is_some() { want - n } else { 0 };
        stats.down.fetch_sub(unused as u64, Ordering::SeqCst);
        if claimed.is_none() {
            stats.down.fetch_add(n as u64, Ordering::SeqCst);
        }
        if n == 0 || !to.send(&buf[..n]) {
            break;
        }
        let mut cut = stats.cut_down.lock().unwrap();
        if cut.is_some_and(|at| stats.down.load(Ordering::SeqCst) >= at) {
            *cut = None;
            break;
        }
    }
    to.close();
}

/// Client to upstream, counting bytes and parsing requests.
fn pump_up(mut from: TcpStream, mut to: Out, stats: &Stats) {
    let mut parser = RequestParser::default();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        parser.feed(&buf[..n], &stats.requests);
        if stats.holding() {
            // Swallow this request and all that follow on this connection.
            continue;
        }
        if !to.send(&buf[..n]) {
            break;
        }
        stats.up.fetch_add(n as u64, Ordering::SeqCst);
    }
    to.close();
}

/// Frames HTTP/1.1 requests in a client byte stream.
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkEnd(u8),
    Trailer(Vec<u8>),
}

struct RequestParser {
    state: State,
}

impl Default for RequestParser {
    fn default() -> Self {
        RequestParser {
            state: State::Head(Vec::new()),
        }
    }
}

impl RequestParser {
    fn feed(&mut self, mut data: &[u8], log: &Mutex<Vec<ProxyRequest>>) {
        while !data.is_empty() {
            let used = self.step(data, log);
            data = &data[used..];
        }
    }

    /// Consumes a prefix of `data`, returning its length (at least 1).
    fn step(&mut self, data: &[u8], log: &Mutex<Vec<ProxyRequest>>) -> usize {
        match &mut self.state {
            State::Body(left) | State::ChunkData(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.state = match self.state {
                        State::ChunkData(_) => State::ChunkEnd(2),
                        _ => State::Head(Vec::new()),
                    };
                }
                n as usize
            }
            State::ChunkEnd(left) => {
                *left -= 1;
                if *left == 0 {
                    self.state = State::ChunkSize(Vec::new());
                }
                1
            }
            State::Head(buf) => {
                buf.push(data[0]);
                if buf.ends_with(b"\r\n\r\n") {
                    let head = std::mem::take(buf);
                    self.state = start_request(&head, log);
                }
                1
            }
            State::ChunkSize(buf) => {
                buf.push(data[0]);
                if buf.ends_with(b"\r\n") {
                    let line = String::from_utf8_lossy(buf).into_owned();
                    let hex = line.trim().split(';').next().unwrap_or("");
                    self.state = match u64::from_str_radix(hex.trim(), 16) {
                        Ok(0) | Err(_) => State::Trailer(Vec::new()),
                        Ok(n) => State::ChunkData(n),
                    };
                }
                1
            }
            State::Trailer(buf) => {
                buf.push(data[0]);
                if buf.as_slice() == b"\r\n" || buf.ends_with(b"\r\n\r\n") {
                    self.state = State::Head(Vec::new());
                }
                1
            }
        }
    }
}

/// Logs the request whose head is `head` and returns the body state.
fn start_request(head: &[u8], log: &Mutex<Vec<ProxyRequest>>) -> State {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let (mut range, mut content_range) = (None, None);
    let (mut length, mut chunked) = (0u64, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(value.to_string()),
            "content-range" => content_range = Some(value.to_string()),
            "content-length" => length = value.parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    log.lock().unwrap().push(ProxyRequest {
        method,
        path,
        range,
        content_range,
    });
    if chunked {
        State::ChunkSize(Vec::new())
    } else if length > 0 {
        State::Body(length)
    } else {
        State::Head(Vec::new())
    }
}

/// A registry whose backend is gone: a real HTTP/1.1 server on a loopback
/// port answering every request `503 Service Unavailable` with a
/// distribution-spec error body (keep-alive, as a proxy in front of a dead
/// registry would), recording each request it got. Started with
/// [`Unavailable::start_answering_ping`], it answers `GET /v2/` itself (a
/// front that is up, its backend down), so a mount of it starts.
pub struct Unavailable {
    addr: String,
    requests: Arc<Mutex<Vec<ProxyRequest>>>,
    stop: Arc<AtomicBool>,
}

/// The error body [`Unavailable`] sends.
pub const UNAVAILABLE_BODY: &str =
    r#"{"errors":[{"code":"UNAVAILABLE","message":"backend registry is down"}]}"#;

impl Unavailable {
    pub fn start() -> Unavailable {
        Self::start_with(false)
    }

    /// Like [`Self::start`], but `GET /v2/` answers `200 {}`.
    pub fn start_answering_ping() -> Unavailable {
        Self::start_with(true)
    }

    fn start_with(ping: bool) -> Unavailable {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 503 server");
        let addr = listener.local_addr().expect("503 server addr").to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, sp) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let log = log.clone();
                std::thread::spawn(move || answer_503(conn, &log, ping));
            }
        });
        Unavailable {
            addr,
            requests,
            stop,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `127.0.0.1:PORT/<repo_and_tag>`.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{repo_and_tag}", self.addr)
    }

    /// Requests answered so far, in arrival order.
    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Forget the requests seen.
    pub fn reset(&self) {
        self.requests.lock().unwrap().clear();
    }
}

impl Drop for Unavailable {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// One 503 per request head on `conn` (a 200 to `GET /v2/` if `ping`),
/// until the client hangs up.
fn answer_503(mut conn: TcpStream, log: &Mutex<Vec<ProxyRequest>>, ping: bool) {
    // Requests of this connection only, so each gets its one answer.
    let mine = Mutex::new(Vec::new());
    let mut parser = RequestParser::default();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        parser.feed(&buf[..n], &mine);
        let new: Vec<ProxyRequest> = std::mem::take(&mut *mine.lock().unwrap());
        for r in new {
            let (status, body) = match (r.method.as_str(), r.path.as_str()) {
                ("GET", "/v2/") if ping => ("200 OK", "{}"),
                _ => ("503 Service Unavailable", UNAVAILABLE_BODY),
            };
            let sent = if r.method == "HEAD" { "" } else { body };
            log.lock().unwrap().push(r);
            let answer = format!(
                "HTTP/1.1 {status}\r\n\
                 Content-Type: application/json\r\n\
                 Docker-Distribution-Api-Version: registry/2.0\r\n\
                 Content-Length: {}\r\n\r\n{sent}",
                body.len()
            );
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }
}
