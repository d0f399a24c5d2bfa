//! A minimal AMQP 0-9-1 publisher written frame by frame over a plain `TcpStream`, for
//! hostile-input tests: it puts any bytes in any property (invalid UTF-8, odd header
//! tables), which a well-behaved client library refuses to send. It speaks just enough of
//! the protocol to log in with PLAIN, open a channel in confirm mode, publish, and wait for
//! the broker's confirm. Blocking I/O: call it from `tokio::task::spawn_blocking`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const FRAME_MAX: u32 = 131_072;
const CHANNEL: u16 = 1;

/// The AMQP property flag bits, in wire order (highest bit first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Property {
    /// `content_type` (shortstr).
    ContentType = 15,
    /// `content_encoding` (shortstr).
    ContentEncoding = 14,
    /// `headers` (field table).
    Headers = 13,
    /// `delivery_mode` (octet).
    DeliveryMode = 12,
    /// `correlation_id` (shortstr).
    CorrelationId = 10,
    /// `message_id` (shortstr).
    MessageId = 7,
    /// `type` (shortstr).
    Type = 5,
    /// `app_id` (shortstr).
    AppId = 3,
}

/// Content-header properties as raw wire bytes, so a test can put anything in them.
#[derive(Debug, Clone, Default)]
pub struct RawProperties {
    fields: Vec<(Property, Vec<u8>)>,
}

impl RawProperties {
    /// Persistent (`delivery_mode = 2`), nothing else.
    pub fn persistent() -> Self {
        Self::default().raw(Property::DeliveryMode, vec![2])
    }

    /// A short-string property with these bytes (need not be UTF-8).
    pub fn short(self, property: Property, bytes: &[u8]) -> Self {
        self.raw(property, short_string(bytes))
    }

    /// The `headers` property from an encoded table (see [`table`]).
    pub fn headers(self, table: Vec<u8>) -> Self {
        self.raw(Property::Headers, table)
    }

    /// A property from its encoded bytes.
    pub fn raw(mut self, property: Property, encoded: Vec<u8>) -> Self {
        self.fields.retain(|(p, _)| *p != property);
        self.fields.push((property, encoded));
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut fields = self.fields.clone();
        fields.sort_by_key(|f| std::cmp::Reverse(f.0));
        let flags = fields.iter().fold(0u16, |f, (p, _)| f | (1 << *p as u16));
        let mut out = flags.to_be_bytes().to_vec();
        for (_, bytes) in fields {
            out.extend(bytes);
        }
        out
    }
}

/// A short string: one length byte, then the bytes (at most 255).
pub fn short_string(bytes: &[u8]) -> Vec<u8> {
    let len = u8::try_from(bytes.len()).expect("a short string holds at most 255 bytes");
    let mut out = vec![len];
    out.extend_from_slice(bytes);
    out
}

/// A long string field value (`S`).
pub fn long_string_value(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![b'S'];
    out.extend(long_bytes(bytes));
    out
}

/// A field table value (`F`) holding an encoded table.
pub fn table_value(table: Vec<u8>) -> Vec<u8> {
    let mut out = vec![b'F'];
    out.extend(table);
    out
}

/// An encoded field table from `(key bytes, encoded value)` entries.
pub fn table(entries: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in entries {
        body.extend(short_string(key));
        body.extend_from_slice(value);
    }
    long_bytes(&body)
}

/// A table nested `depth` levels deep: `{"n": {"n": ... {"leaf": "x"}}}`.
pub fn nested_table(depth: usize) -> Vec<u8> {
    let mut t = table(&[(b"leaf", long_string_value(b"x"))]);
    for _ in 1..depth {
        t = table(&[(b"n", table_value(t))]);
    }
    t
}

fn long_bytes(bytes: &[u8]) -> Vec<u8> {
    let len = u32::try_from(bytes.len()).expect("at most 4 GiB");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// Where and how to log in: parsed from an `amqp://user:pass@host:port/vhost` URL.
#[derive(Debug, Clone)]
struct Target {
    addr: String,
    user: String,
    password: String,
    vhost: String,
}

fn target(url: &str) -> io::Result<Target> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected amqp://user:pass@host:port/vhost",
        )
    };
    let rest = url.strip_prefix("amqp://").ok_or_else(bad)?;
    let (auth, rest) = rest.split_once('@').ok_or_else(bad)?;
    let (user, password) = auth.split_once(':').ok_or_else(bad)?;
    let (host, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let vhost = match vhost {
        "" => "/".to_owned(),
        v => v.replace("%2f", "/").replace("%2F", "/"),
    };
    let addr = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    Ok(Target {
        addr,
        user: user.to_owned(),
        password: password.to_owned(),
        vhost,
    })
}

/// One logged-in connection with channel 1 open in confirm mode.
pub struct RawPublisher {
    stream: TcpStream,
    next_tag: u64,
}

impl RawPublisher {
    /// Connect and log in to the broker at `url` (`amqp://` only).
    pub fn connect(url: &str) -> io::Result<Self> {
        let t = target(url)?;
        let stream = TcpStream::connect(&t.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut p = Self {
            stream,
            next_tag: 1,
        };
        p.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        p.expect_method(0, 10, 10)?; // connection.start
        let mut start_ok = method(10, 11);
        start_ok.extend(long_bytes(&[])); // client properties: empty table
        start_ok.extend(short_string(b"PLAIN"));
        start_ok.extend(long_bytes(
            format!("\0{}\0{}", t.user, t.password).as_bytes(),
        ));
        start_ok.extend(short_string(b"en_US"));
        p.send(FRAME_METHOD, 0, &start_ok)?;
        let tune = p.expect_method(0, 10, 30)?;
        let channel_max = tune.get(4..6).unwrap_or(&[0, 0]).to_vec();
        let mut tune_ok = method(10, 31);
        tune_ok.extend(channel_max);
        tune_ok.extend(FRAME_MAX.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats: the connection is short-lived
        p.send(FRAME_METHOD, 0, &tune_ok)?;
        let mut open = method(10, 40);
        open.extend(short_string(t.vhost.as_bytes()));
        open.extend(short_string(b""));
        open.push(0);
        p.send(FRAME_METHOD, 0, &open)?;
        p.expect_method(0, 10, 41)?;
        let mut channel_open = method(20, 10);
        channel_open.extend(short_string(b""));
        p.send(FRAME_METHOD, CHANNEL, &channel_open)?;
        p.expect_method(CHANNEL, 20, 11)?;
        let mut select = method(85, 10);
        select.push(0);
        p.send(FRAME_METHOD, CHANNEL, &select)?;
        p.expect_method(CHANNEL, 85, 11)?;
        Ok(p)
    }

    /// Publish `body` with `properties` to `exchange`/`routing_key` and wait for the
    /// broker's confirm. An error if the broker nacks or closes the channel.
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &[u8],
        properties: &RawProperties,
        body: &[u8],
    ) -> io::Result<()> {
        let mut publish = method(60, 40);
        publish.extend(0u16.to_be_bytes());
        publish.extend(short_string(exchange.as_bytes()));
        publish.extend(short_string(routing_key));
        publish.push(0); // not mandatory, not immediate
        self.send(FRAME_METHOD, CHANNEL, &publish)?;
        let mut header = Vec::new();
        header.extend(60u16.to_be_bytes());
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend(properties.encode());
        self.send(FRAME_HEADER, CHANNEL, &header)?;
        let chunk = (FRAME_MAX - 8) as usize;
        for part in body.chunks(chunk) {
            self.send(FRAME_BODY, CHANNEL, part)?;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        loop {
            let (channel, payload) = self.read_method()?;
            match (class_method(&payload), channel) {
                ((60, 80), CHANNEL) => {
                    let acked = payload
                        .get(4..12)
                        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
                    if acked.is_some_and(|a| a >= tag) {
                        return Ok(());
                    }
                }
                ((60, 120), CHANNEL) => {
                    return Err(io::Error::other("the broker nacked the raw publish"));
                }
                _ => return Err(unexpected(channel, &payload)),
            }
        }
    }

    /// Close the connection politely.
    pub fn close(mut self) -> io::Result<()> {
        let mut close = method(10, 50);
        close.extend(200u16.to_be_bytes());
        close.extend(short_string(b"done"));
        close.extend(0u16.to_be_bytes());
        close.extend(0u16.to_be_bytes());
        self.send(FRAME_METHOD, 0, &close)?;
        self.expect_method(0, 10, 51).map(|_| ())
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend(channel.to_be_bytes());
        frame.extend(
            u32::try_from(payload.len())
                .map_err(io::Error::other)?
                .to_be_bytes(),
        );
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame)
    }

    /// The next method frame (heartbeats skipped): its channel and payload.
    fn read_method(&mut self) -> io::Result<(u16, Vec<u8>)> {
        loop {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head)?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload)?;
            if payload.pop() != Some(FRAME_END) {
                return Err(io::Error::other("frame without its end marker"));
            }
            match head[0] {
                FRAME_HEARTBEAT => continue,
                FRAME_METHOD => return Ok((u16::from_be_bytes([head[1], head[2]]), payload)),
                other => return Err(io::Error::other(format!("unexpected frame type {other}"))),
            }
        }
    }

    fn expect_method(&mut self, channel: u16, class: u16, id: u16) -> io::Result<Vec<u8>> {
        let (ch, payload) = self.read_method()?;
        if ch == channel && class_method(&payload) == (class, id) {
            Ok(payload)
        } else {
            Err(unexpected(ch, &payload))
        }
    }
}

fn method(class: u16, id: u16) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend(id.to_be_bytes());
    out
}

fn class_method(payload: &[u8]) -> (u16, u16) {
    let word = |i: usize| {
        payload
            .get(i..i + 2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
    };
    (word(0), word(2))
}

/// An error describing an unexpected method, with the reply text of a close.
fn unexpected(channel: u16, payload: &[u8]) -> io::Error {
    let (class, id) = class_method(payload);
    let text = if matches!((class, id), (10, 50) | (20, 40)) {
        // connection.close / channel.close: reply-code, then reply-text.
        let code = payload
            .get(4..6)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        let len = payload.get(6).copied().unwrap_or(0) as usize;
        let reply = payload.get(7..7 + len).unwrap_or(&[]);
        format!(": {code} {}", String::from_utf8_lossy(reply))
    } else {
        String::new()
    };
    io::Error::other(format!(
        "unexpected method {class}.{id} on channel {channel}{text}"
    ))
}

/// Publish one message through a fresh raw connection (blocking I/O on a worker thread).
pub async fn publish(
    url: &str,
    exchange: &str,
    routing_key: &[u8],
    properties: RawProperties,
    body: Vec<u8>,
) -> io::Result<()> {
    let (url, exchange, routing_key) = (url.to_owned(), exchange.to_owned(), routing_key.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut p = RawPublisher::connect(&url)?;
        p.publish(&exchange, &routing_key, &properties, &body)?;
        p.close()
    })
    .await
    .map_err(io::Error::other)?
}

/// A TCP proxy in front of the broker that breaks, on the way to the client, every
/// content-header frame holding `marker`: the type tag of the field value that follows the
/// marker (a header key) becomes `Z`, which no AMQP type uses. RabbitMQ itself refuses such
/// a frame from a publisher, so this is how a test shows what a consumer does with a
/// delivery its client library cannot parse at all. Stops when dropped.
pub struct CorruptingProxy {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    corrupted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CorruptingProxy {
    /// Listen on a free loopback port, forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str, marker: &[u8]) -> io::Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let corrupted = Arc::new(AtomicUsize::new(0));
        let (upstream, marker) = (upstream.to_owned(), marker.to_vec());
        let (stop_flag, count) = (Arc::clone(&stop), Arc::clone(&corrupted));
        std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => return,
                };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Both);
                });
                let (marker, count) = (marker.clone(), Arc::clone(&count));
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let _ = relay_frames(&mut server, &mut client, &marker, &count);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Ok(Self {
            port,
            stop,
            corrupted,
        })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many frames it broke so far.
    pub fn corrupted(&self) -> usize {
        self.corrupted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copy frames from `server` to `client`, breaking content headers that hold `marker`.
fn relay_frames(
    server: &mut TcpStream,
    client: &mut TcpStream,
    marker: &[u8],
    corrupted: &std::sync::atomic::AtomicUsize,
) -> io::Result<()> {
    loop {
        let mut head = [0u8; 7];
        server.read_exact(&mut head)?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        server.read_exact(&mut payload)?;
        if head[0] == FRAME_HEADER
            && let Some(at) = payload.windows(marker.len()).position(|w| w == marker)
            && let Some(tag) = payload.get_mut(at + marker.len())
        {
            *tag = b'Z';
            corrupted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        client.write_all(&head)?;
        client.write_all(&payload)?;
    }
}
