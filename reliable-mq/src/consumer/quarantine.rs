//! Moving aside, with the broker's help, a message the client library cannot parse.
//!
//! lapin reads whole frames: when it cannot parse a delivery's content header it closes the
//! connection, the broker puts the message back at the front of the queue, and every
//! session receives it first and dies the same way. Acking or rejecting it needs its
//! delivery tag on a live channel, which lapin never gives us. So this opens a separate,
//! minimal AMQP 0-9-1 connection that reads frames without interpreting them, takes the
//! queue's first message with `basic.get` (unacked), checks whether lapin's own parser can
//! read its method and properties, and only if it cannot, `basic.reject`s it without
//! requeue: the broker dead-letters it through the queue's `x-dead-letter-exchange` into
//! the DLQ (`x-death` reason `rejected`, the original bytes untouched). A readable message
//! is left alone: closing the connection puts it back where it was.
//!
//! Plain `amqp://` addresses only (no TLS on this path); blocking I/O, run on a blocking
//! thread with socket timeouts.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lapin::protocol::basic;
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::Config;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const CHANNEL: u16 = 1;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame we accept from the broker (the size we offer in `tune-ok`).
const FRAME_MAX: u32 = 131_072;

/// What a quarantine attempt found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Quarantine {
    /// The first message could not be parsed and was rejected into the DLQ.
    Rejected,
    /// The first message is readable (or the queue is empty): nothing was done.
    NothingToDo,
}

/// Look at the first message of `queue`; reject it (no requeue) if lapin cannot parse it.
pub(crate) async fn reject_unreadable_head(
    config: &Config,
    queue: &str,
) -> Result<Quarantine, String> {
    let urls: Vec<String> = config.amqp_urls().into_iter().map(str::to_owned).collect();
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut last =
            String::from("no amqp:// address in AMQP_URL (the quarantine does not speak TLS)");
        for url in &urls {
            let Ok(uri) = url.parse::<AMQPUri>() else {
                continue;
            };
            if uri.scheme != AMQPScheme::AMQP {
                continue;
            }
            match RawChannel::open(&uri).and_then(|mut ch| ch.reject_unreadable_head(&queue)) {
                Ok(outcome) => return Ok(outcome),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// One connection with channel 1 open.
struct RawChannel {
    stream: TcpStream,
}

impl RawChannel {
    fn open(uri: &AMQPUri) -> io::Result<Self> {
        let stream = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Self { stream };
        c.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        c.expect(0, 10, 10)?; // connection.start
        let user = &uri.authority.userinfo;
        let mut start_ok = method(10, 11);
        start_ok.extend(long_bytes(&[])); // no client properties
        start_ok.extend(short_string(b"PLAIN")?);
        start_ok.extend(long_bytes(
            format!("\0{}\0{}", user.username, user.password).as_bytes(),
        ));
        start_ok.extend(short_string(b"en_US")?);
        c.send(FRAME_METHOD, 0, &start_ok)?;
        let tune = c.expect(0, 10, 30)?;
        let mut tune_ok = method(10, 31);
        tune_ok.extend(tune.get(4..6).unwrap_or(&[0, 0]));
        tune_ok.extend(FRAME_MAX.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats: the connection lives seconds
        c.send(FRAME_METHOD, 0, &tune_ok)?;
        let mut open = method(10, 40);
        open.extend(short_string(uri.vhost.as_bytes())?);
        open.extend(short_string(b"")?);
        open.push(0);
        c.send(FRAME_METHOD, 0, &open)?;
        c.expect(0, 10, 41)?;
        let mut channel_open = method(20, 10);
        channel_open.extend(short_string(b"")?);
        c.send(FRAME_METHOD, CHANNEL, &channel_open)?;
        c.expect(CHANNEL, 20, 11)?;
        Ok(c)
    }

    fn reject_unreadable_head(&mut self, queue: &str) -> io::Result<Quarantine> {
        let mut get = method(60, 70);
        get.extend(0u16.to_be_bytes());
        get.extend(short_string(queue.as_bytes())?);
        get.push(0); // no_ack = false: we decide below
        self.send(FRAME_METHOD, CHANNEL, &get)?;
        let (channel, get_ok) = self.read_method()?;
        let outcome = match (channel, class_method(&get_ok)) {
            (CHANNEL, (60, 72)) => Quarantine::NothingToDo, // get-empty
            (CHANNEL, (60, 71)) => {
                let header = self.read_content()?;
                let readable = get_ok
                    .get(4..)
                    .is_some_and(|args| basic::parse_get_ok(args).is_ok())
                    && header
                        .get(12..)
                        .is_some_and(|props| basic::parse_properties(props).is_ok());
                if readable {
                    Quarantine::NothingToDo
                } else {
                    let tag = get_ok.get(4..12).ok_or_else(|| bad("short get-ok"))?;
                    let mut reject = method(60, 90);
                    reject.extend_from_slice(tag);
                    reject.push(0); // requeue = false: the queue's DLX takes it
                    self.send(FRAME_METHOD, CHANNEL, &reject)?;
                    Quarantine::Rejected
                }
            }
            _ => return Err(unexpected(&get_ok)),
        };
        // Closing the connection settles everything: a reject is processed before the
        // close-ok, an unacked readable message goes back to its place.
        let mut close = method(10, 50);
        close.extend(200u16.to_be_bytes());
        close.extend(short_string(b"quarantine done")?);
        close.extend([0, 0, 0, 0]);
        self.send(FRAME_METHOD, 0, &close)?;
        self.expect(0, 10, 51)?;
        Ok(outcome)
    }

    /// The content header after a `get-ok` (its payload), with the body frames skipped.
    fn read_content(&mut self) -> io::Result<Vec<u8>> {
        let (kind, _, header) = self.read_frame()?;
        if kind != FRAME_HEADER {
            return Err(bad("no content header after get-ok"));
        }
        let size = header
            .get(4..12)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| bad("short content header"))?;
        let mut read = 0u64;
        while read < size {
            let (kind, _, body) = self.read_frame()?;
            if kind != FRAME_BODY {
                return Err(bad("body frame expected"));
            }
            read += body.len() as u64;
        }
        Ok(header)
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
        let size = u32::try_from(payload.len()).map_err(|_| bad("frame too large"))?;
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend(channel.to_be_bytes());
        frame.extend(size.to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame)
    }

    fn read_frame(&mut self) -> io::Result<(u8, u16, Vec<u8>)> {
        loop {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head)?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
            if size > FRAME_MAX {
                return Err(bad("frame over the negotiated size"));
            }
            let mut payload = vec![0u8; size as usize + 1];
            self.stream.read_exact(&mut payload)?;
            if payload.pop() != Some(FRAME_END) {
                return Err(bad("frame without its end marker"));
            }
            if head[0] != FRAME_HEARTBEAT {
                return Ok((head[0], u16::from_be_bytes([head[1], head[2]]), payload));
            }
        }
    }

    fn read_method(&mut self) -> io::Result<(u16, Vec<u8>)> {
        match self.read_frame()? {
            (FRAME_METHOD, channel, payload) => Ok((channel, payload)),
            _ => Err(bad("method frame expected")),
        }
    }

    fn expect(&mut self, channel: u16, class: u16, id: u16) -> io::Result<Vec<u8>> {
        let (ch, payload) = self.read_method()?;
        if ch == channel && class_method(&payload) == (class, id) {
            Ok(payload)
        } else {
            Err(unexpected(&payload))
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

fn short_string(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let len = u8::try_from(bytes.len()).map_err(|_| bad("short string over 255 bytes"))?;
    let mut out = vec![len];
    out.extend_from_slice(bytes);
    Ok(out)
}

fn long_bytes(bytes: &[u8]) -> Vec<u8> {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// An unexpected method, with the reply text when it is a close.
fn unexpected(payload: &[u8]) -> io::Error {
    let (class, id) = class_method(payload);
    let text = if matches!((class, id), (10, 50) | (20, 40)) {
        let code = payload
            .get(4..6)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        let len = payload.get(6).copied().unwrap_or(0) as usize;
        let reply = payload.get(7..7 + len).unwrap_or(&[]);
        format!(": {code} {}", String::from_utf8_lossy(reply))
    } else {
        String::new()
    };
    io::Error::other(format!("unexpected method {class}.{id}{text}"))
}
