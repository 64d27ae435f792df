#!/usr/bin/env python3
"""A TCP proxy that makes a loopback registry look like one across a WAN.

    wanproxy.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT \
                --delay-ms 10 --rate-mbit 200 [--log FILE]

Link model, per direction: bytes read from one side pass a rate limit (a
token bucket shared by every connection in that direction, so N parallel
connections share --rate-mbit, as on one access link), then arrive on the
other side --delay-ms later. Each direction keeps a queue of
(deliver_at, bytes); the reader never sleeps per read, so throughput is
bounded by the rate, not by delay / read size. The queue is bounded
(a few bandwidth-delay products) to give the sender TCP back-pressure.

A new connection also pays the TCP handshake: the client's first bytes
leave no earlier than one round trip (2 x delay) after accept, as if
connect() had returned only then (--no-handshake turns this off). TLS is
not modelled: a real HTTPS registry costs one or two more round trips per
new connection.

HTTP accounting: the client->server stream is parsed into requests
(keep-alive and pipelining, bodies framed by Content-Length or chunked),
and the server->client stream into responses (HEAD / 1xx / 204 / 304 have
no body). The log gets, per request when the proxy sees it:

    METHOD PATH RANGE<TAB>conn=C t=SECONDS

(RANGE is the Range header's value, "-" if none; t is seconds since the
proxy started), and per response when its last byte has been read from
the server:

    # resp conn=C t=SECONDS status=S bytes=N

(N: header + body bytes). On SIGUSR1 a stats line is appended, on SIGTERM
or SIGINT a totals line, then the proxy exits:

    # stats requests N bytes_down M bytes_up U conns C
    # requests N bytes_down M bytes_up U conns C

`grep -v '^#' LOG` is the request sequence. "ready" is printed on stdout
once listening.
"""

import argparse
import asyncio
import collections
import signal
import socket
import sys
import time

CHUNK = 64 * 1024
T0 = time.monotonic()


def now():
    return time.monotonic()


class Link:
    """A shared rate limit (virtual-clock token bucket) for one direction.

    reserve(n) books n bytes on the link and returns when their last byte
    has left it; bookings are first come, first served. An idle link may
    send a burst of up to `burst` bytes at once.
    """

    def __init__(self, rate_bytes, burst):
        self.rate = rate_bytes  # bytes/s; 0 = unlimited
        self.slack = burst / rate_bytes if rate_bytes else 0.0
        self.free_at = 0.0

    def reserve(self, n, t):
        if not self.rate:
            return t
        start = max(self.free_at, t - self.slack)
        self.free_at = start + n / self.rate
        return max(self.free_at, t)


class Stats:
    def __init__(self):
        self.requests = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.conns = 0

    def line(self, prefix):
        return (f"# {prefix}requests {self.requests} bytes_down {self.bytes_down} "
                f"bytes_up {self.bytes_up} conns {self.conns}")


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None

    def write(self, line):
        if self.f:
            self.f.write(line + "\n")


class HeaderBlock:
    """Collects one header block (up to CRLFCRLF) from a byte stream."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data, i):
        """Consumes from data[i:]; returns (end_index, header_bytes or None)."""
        # Look for the terminator across the boundary with earlier bytes.
        start = len(self.buf)
        self.buf += data[i:]
        k = self.buf.find(b"\r\n\r\n", max(0, start - 3))
        if k < 0:
            if len(self.buf) > 1 << 20:
                raise ValueError("header block over 1 MiB")
            return len(data), None
        block = bytes(self.buf[:k + 4])
        used = k + 4 - start
        self.buf = bytearray()
        return i + used, block


def parse_headers(block):
    lines = block.decode("latin-1").split("\r\n")
    first = lines[0]
    h = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            h[k.strip().lower()] = v.strip()
    return first, h


class Body:
    """Skips a message body: a length, chunked framing, or until close."""

    def __init__(self, length=None, chunked=False):
        self.left = length  # None + not chunked = until close
        self.chunked = chunked
        self.state = "size"  # chunked: size, data, data_crlf, trailer
        self.line = bytearray()

    def feed(self, data, i):
        """Consumes from data[i:]; returns (end_index, done)."""
        n = len(data)
        if not self.chunked:
            if self.left is None:
                return n, False
            take = min(self.left, n - i)
            self.left -= take
            return i + take, self.left == 0
        while i < n:
            if self.state in ("size", "trailer", "data_crlf"):
                j = data.find(b"\n", i)
                if j < 0:
                    self.line += data[i:]
                    return n, False
                self.line += data[i:j]
                i = j + 1
                line = bytes(self.line).strip()
                self.line = bytearray()
                if self.state == "size":
                    size = int(line.split(b";")[0] or b"0", 16)
                    if size == 0:
                        self.state = "trailer"
                    else:
                        self.left = size
                        self.state = "data"
                elif self.state == "data_crlf":
                    self.state = "size"
                elif not line:  # end of trailer
                    return i, True
            else:  # data
                take = min(self.left, n - i)
                self.left -= take
                i += take
                if self.left == 0:
                    self.state = "data_crlf"
        return i, False


def framed_body(h, method=None, status=None):
    """The Body of a message with headers h, or None when it has none."""
    if method == "HEAD" or (status is not None and (status < 200 or status in (204, 304))):
        return None
    if "chunked" in h.get("transfer-encoding", "").lower():
        return Body(chunked=True)
    if "content-length" in h:
        n = int(h["content-length"])
        return Body(length=n) if n else None
    if status is None:  # a request without a length has no body
        return None
    return Body()  # response until close


class RequestParser:
    def __init__(self, conn):
        self.conn = conn
        self.head = HeaderBlock()
        self.body = None

    def feed(self, data):
        i, n = 0, len(data)
        while i < n:
            if self.body is not None:
                i, done = self.body.feed(data, i)
                if done:
                    self.body = None
                continue
            i, block = self.head.feed(data, i)
            if block is None:
                continue
            if block.strip() == b"":  # stray CRLF between requests
                continue
            first, h = parse_headers(block)
            parts = first.split(" ")
            method = parts[0]
            path = parts[1] if len(parts) > 1 else "?"
            self.conn.on_request(method, path, h.get("range", "-").replace(" ", ""))
            self.body = framed_body(h)


class ResponseParser:
    def __init__(self, conn):
        self.conn = conn
        self.head = HeaderBlock()
        self.body = None
        self.bytes = 0
        self.status = None

    def feed(self, data):
        i, n = 0, len(data)
        while i < n:
            if self.body is not None:
                j, done = self.body.feed(data, i)
                self.bytes += j - i
                i = j
                if done:
                    self.body = None
                    self.finish()
                continue
            j, block = self.head.feed(data, i)
            self.bytes += j - i
            i = j
            if block is None:
                continue
            first, h = parse_headers(block)
            parts = first.split(" ")
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if 100 <= self.status < 200:  # interim: the real response follows
                continue
            method = self.conn.methods.popleft() if self.conn.methods else "GET"
            self.body = framed_body(h, method=method, status=self.status)
            if self.body is None:
                self.finish()

    def finish(self):
        self.conn.on_response(self.status, self.bytes)
        self.bytes = 0

    def close(self):
        if self.body is not None or self.bytes:
            self.conn.on_response(self.status, self.bytes, note=" (cut)")


class Pipe:
    """One direction: read -> link -> queue -> (delay) -> write."""

    def __init__(self, proxy, reader, writer, link, on_data, not_before=0.0):
        self.p = proxy
        self.reader = reader
        self.writer = writer
        self.link = link
        self.on_data = on_data
        self.not_before = not_before
        self.q = collections.deque()
        self.queued = 0
        self.wake = asyncio.Event()  # writer: the queue has something
        self.room = asyncio.Event()  # reader: the queue has room
        self.room.set()

    async def read_loop(self):
        try:
            while True:
                if self.queued >= self.p.max_queue:
                    self.room.clear()
                    await self.room.wait()
                data = await self.reader.read(CHUNK)
                t = now()
                if not data:
                    break
                try:
                    self.on_data(data)
                except Exception as e:  # accounting must never break the stream
                    self.p.log.write(f"# parse error: {e!r}")
                    self.on_data = lambda d: None
                sent = self.link.reserve(len(data), max(t, self.not_before))
                self.q.append((sent + self.p.delay, data))
                self.queued += len(data)
                self.wake.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.q.append((max(now(), self.not_before) + self.p.delay, None))
            self.wake.set()

    async def write_loop(self):
        try:
            while True:
                while not self.q:
                    self.wake.clear()
                    await self.wake.wait()
                at, data = self.q[0]
                d = at - now()
                if d > 0:
                    await asyncio.sleep(d)
                self.q.popleft()
                if data is None:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.queued -= len(data)
                self.room.set()
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass


class Conn:
    def __init__(self, proxy, cid):
        self.p = proxy
        self.cid = cid
        self.methods = collections.deque()

    def on_request(self, method, path, rng):
        self.p.stats.requests += 1
        self.methods.append(method)
        self.p.log.write(f"{method} {path} {rng}\tconn={self.cid} t={now() - T0:.4f}")

    def on_response(self, status, n, note=""):
        self.p.log.write(f"# resp conn={self.cid} t={now() - T0:.4f} status={status} bytes={n}{note}")

    def up(self, data):
        self.p.stats.bytes_up += len(data)
        self.req.feed(data)

    def down(self, data):
        self.p.stats.bytes_down += len(data)
        self.resp.feed(data)

    async def run(self, creader, cwriter):
        accepted = now()
        self.req = RequestParser(self)
        self.resp = ResponseParser(self)
        try:
            sreader, swriter = await asyncio.open_connection(*self.p.upstream, limit=CHUNK * 4)
        except OSError as e:
            self.p.log.write(f"# conn={self.cid} upstream connect failed: {e}")
            cwriter.close()
            return
        for w in (cwriter, swriter):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake = accepted + 2 * self.p.delay if self.p.handshake else 0.0
        up = Pipe(self.p, creader, swriter, self.p.up_link, self.up, not_before=handshake)
        down = Pipe(self.p, sreader, cwriter, self.p.down_link, self.down)
        tasks = [asyncio.create_task(c) for c in
                 (up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop())]
        try:
            # Done when the server's side has been delivered in full (or either
            # side broke); a client half-close alone keeps the response flowing.
            await tasks[3]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.resp.close()
            for w in (cwriter, swriter):
                try:
                    w.close()
                except Exception:
                    pass


class Proxy:
    def __init__(self, a):
        self.upstream = hostport(a.upstream)
        self.delay = a.delay_ms / 1000.0
        rate = a.rate_mbit * 1e6 / 8
        up_rate = (a.up_rate_mbit if a.up_rate_mbit is not None else a.rate_mbit) * 1e6 / 8
        self.down_link = Link(rate, burst=CHUNK)
        self.up_link = Link(up_rate, burst=CHUNK)
        self.handshake = not a.no_handshake and self.delay > 0
        # Room for a few bandwidth-delay products, at least 1 MiB.
        self.max_queue = max(1 << 20, int(4 * max(rate, up_rate) * self.delay))
        self.log = Log(a.log)
        self.stats = Stats()
        self.next_id = 0

    async def handle(self, r, w):
        self.next_id += 1
        self.stats.conns += 1
        await Conn(self, self.next_id).run(r, w)


def hostport(s):
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


async def main(a):
    p = Proxy(a)
    host, port = hostport(a.listen)
    server = await asyncio.start_server(p.handle, host, port, limit=CHUNK * 4,
                                        reuse_address=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: p.log.write(p.stats.line("stats ")))
    p.log.write(f"# wanproxy {a.listen} -> {a.upstream} delay_ms {a.delay_ms} "
                f"rate_mbit {a.rate_mbit} handshake {int(p.handshake)}")
    print("ready", flush=True)
    await stop.wait()
    server.close()
    p.log.write(p.stats.line(""))
    print(p.stats.line(""), file=sys.stderr, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay, each direction")
    ap.add_argument("--rate-mbit", type=float, default=200.0,
                    help="server->client rate shared by all connections (0: unlimited)")
    ap.add_argument("--up-rate-mbit", type=float, default=None,
                    help="client->server rate (default: --rate-mbit; 0: unlimited)")
    ap.add_argument("--no-handshake", action="store_true",
                    help="don't charge a new connection one round trip")
    ap.add_argument("--log", help="request log (appended, line-buffered)")
    try:
        asyncio.run(main(ap.parse_args()))
    except KeyboardInterrupt:
        pass
