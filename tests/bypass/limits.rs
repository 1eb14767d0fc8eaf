//! Resource attacks: a client that tries to make the gate hold memory, a connection or a
//! passkey prompt without bound. Every row ends in a clear refusal (or a closed connection,
//! where HTTP has no one to answer) and the exchange sees nothing.
//!
//! The classes: slow-loris (slow or stalled request heads, Robert Hansen 2009) and slow POST
//! (R-U-Dead-Yet: bodies dribbled byte by byte, which a buffering proxy must bound in time);
//! oversized heads and bodies (memory exhaustion in a buffering proxy; the gate buffers only
//! protected bodies, and only up to `max_body_bytes`); and flooding per-user state (held
//! changes, WebAuthn challenges) to crowd out or bury the real one.
//!
//! The gate here runs with `max_header_bytes = 16KiB`, `header_timeout = 1s`,
//! `body_timeout = 1s`, `max_body_bytes = 64KiB`, `max_pending_per_user = 3` and
//! `max_ceremonies_per_minute = 3` (see `helpers::LIMITS`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{exchange, read_response, Expect, Gate, Sent, WITHDRAW};

use Expect::{Held, Refused, Rejected};

/// How long a stalled client may keep its connection at most: generous against CI jitter,
/// far below "forever".
const DISCONNECT_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum LimitAttack {
    /// A GET (or a protected PUT) whose head carries a `pad`-byte header.
    BigHead { protected: bool, pad: usize },
    /// Half a request head, then silence.
    StalledHead,
    /// A whole request head, one byte every 150 ms (~12 s in all).
    DribbledHead,
    /// A protected change that declares a body longer than the limit.
    DeclaredBody { length: usize },
    /// A chunked body of `total` bytes on a protected (or unprotected) route.
    ChunkedBody { protected: bool, total: usize },
    /// A protected change whose 35-byte body arrives one byte every 200 ms.
    DribbledBody,
    /// A protected change whose body stops half-way.
    StalledBody,
    /// `count` different withdrawal changes by one user; the last must get `expect`.
    PendingChanges { count: usize },
    /// `count` passkey registrations started by one user; the last must get `expect`.
    CeremonyStarts { count: usize },
}

#[derive(Debug, Clone, Copy)]
enum LimitExpect {
    Outcome(Expect),
    /// The gate closes the connection within [`DISCONNECT_BOUND`], after at least `after`
    /// (so it is the timeout acting, not an instant refusal), before the head was complete.
    Disconnected {
        after: Duration,
    },
}

struct LimitRow {
    name: &'static str,
    attack: LimitAttack,
    expect: LimitExpect,
}

static ROWS: &[LimitRow] = &[
    // --- Head size: hyper answers 431 itself once the head outgrows `max_header_bytes`.
    LimitRow {
        name: "17 KiB header on an unprotected route",
        attack: LimitAttack::BigHead {
            protected: false,
            pad: 17 * 1024,
        },
        expect: LimitExpect::Outcome(Rejected(431)),
    },
    LimitRow {
        name: "17 KiB header on a protected change",
        attack: LimitAttack::BigHead {
            protected: true,
            pad: 17 * 1024,
        },
        expect: LimitExpect::Outcome(Rejected(431)),
    },
    // The control: a large but allowed head is served.
    LimitRow {
        name: "8 KiB header is served",
        attack: LimitAttack::BigHead {
            protected: false,
            pad: 8 * 1024,
        },
        expect: LimitExpect::Outcome(Expect::Passed {
            upstream_path: "/api/v1/account",
            seen: &[],
        }),
    },
    // --- Slow-loris: the head must be complete within `header_timeout` (a deadline for the
    // whole head, not an idle timer a byte can reset).
    LimitRow {
        name: "stalled request head",
        attack: LimitAttack::StalledHead,
        expect: LimitExpect::Disconnected {
            after: Duration::from_millis(500),
        },
    },
    LimitRow {
        name: "request head dribbled a byte at a time",
        attack: LimitAttack::DribbledHead,
        expect: LimitExpect::Disconnected {
            after: Duration::from_millis(500),
        },
    },
    // --- Body size on protected routes: refused when declared, and when streamed without a
    // declared length; nothing beyond the limit is buffered.
    LimitRow {
        name: "declared body over max_body_bytes",
        attack: LimitAttack::DeclaredBody { length: 70 * 1024 },
        expect: LimitExpect::Outcome(Refused(413, "body_too_large")),
    },
    LimitRow {
        name: "chunked body over max_body_bytes",
        attack: LimitAttack::ChunkedBody {
            protected: true,
            total: 66 * 1024,
        },
        expect: LimitExpect::Outcome(Refused(413, "body_too_large")),
    },
    // The control: unprotected bodies stream through, whatever their size.
    LimitRow {
        name: "large chunked body on an unprotected route streams through",
        attack: LimitAttack::ChunkedBody {
            protected: false,
            total: 256 * 1024,
        },
        expect: LimitExpect::Outcome(Expect::Passed {
            upstream_path: "/api/v1/orders",
            seen: &[],
        }),
    },
    // --- Slow POST on a protected route: the body must arrive within `body_timeout`.
    LimitRow {
        name: "protected body dribbled a byte at a time",
        attack: LimitAttack::DribbledBody,
        expect: LimitExpect::Outcome(Refused(408, "body_timeout")),
    },
    LimitRow {
        name: "protected body that stops half-way",
        attack: LimitAttack::StalledBody,
        expect: LimitExpect::Outcome(Refused(408, "body_timeout")),
    },
    // --- Per-user caps.
    LimitRow {
        name: "a fourth pending change",
        attack: LimitAttack::PendingChanges { count: 4 },
        expect: LimitExpect::Outcome(Refused(429, "too_many_pending_changes")),
    },
    LimitRow {
        name: "a fourth passkey prompt within a minute",
        attack: LimitAttack::CeremonyStarts { count: 4 },
        expect: LimitExpect::Outcome(Refused(429, "too_many_ceremonies")),
    },
];

fn head(method: &str, target: &str, user: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: gate.test\r\nx-user-id: {user}\r\n{extra}")
}

fn protected_head(user: &str, extra: &str) -> String {
    head(
        "PUT",
        "/api/v1/api-keys/k1",
        user,
        &format!("content-type: application/json\r\n{extra}"),
    )
}

async fn run_limit_row(gate: &Gate, row: &LimitRow, user: &str) -> Result<(), String> {
    gate.clear();
    let outcome = match row.attack {
        LimitAttack::BigHead { protected, pad } => {
            let padding = format!("x-pad: {}\r\n", "a".repeat(pad));
            let (text, sent) = if protected {
                let text = protected_head(user, &format!("{padding}content-length: 35\r\n\r\n"));
                (text.into_bytes(), None)
            } else {
                let text = head("GET", "/api/v1/account", user, &format!("{padding}\r\n"));
                let sent = Sent {
                    method: "GET",
                    body: b"",
                };
                (text.into_bytes(), Some(sent))
            };
            let mut bytes = text;
            if protected {
                bytes.extend_from_slice(WITHDRAW);
            }
            let response = exchange(gate.addr, &bytes, false)
                .await
                .map_err(|e| format!("no answer: {e}"))?;
            return finish(gate, row, &response, sent.as_ref(), user).await;
        }
        LimitAttack::StalledHead | LimitAttack::DribbledHead => {
            let dribble = matches!(row.attack, LimitAttack::DribbledHead);
            return disconnects(gate, row, user, dribble).await;
        }
        LimitAttack::DeclaredBody { length } => {
            let mut stream = connect(gate).await?;
            let text = protected_head(user, &format!("content-length: {length}\r\n\r\n"));
            write(&mut stream, text.as_bytes()).await?;
            // A first slice of the body; the gate must answer without waiting for the rest.
            write(&mut stream, &[b' '; 100]).await?;
            read(&mut stream).await?
        }
        LimitAttack::ChunkedBody { protected, total } => {
            let text = if protected {
                protected_head(user, "transfer-encoding: chunked\r\n\r\n")
            } else {
                head(
                    "POST",
                    "/api/v1/orders",
                    user,
                    "content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                )
            };
            let mut stream = connect(gate).await?;
            write(&mut stream, text.as_bytes()).await?;
            let (mut reader, mut writer) = stream.into_split();
            // Write and read at once: the gate answers 413 before the body has ended.
            let sender = tokio::spawn(async move {
                let chunk = vec![b' '; 8 * 1024];
                let mut left = total;
                while left > 0 {
                    let len = left.min(chunk.len());
                    let frame =
                        [format!("{len:x}\r\n").as_bytes(), &chunk[..len], b"\r\n"].concat();
                    if writer.write_all(&frame).await.is_err() {
                        return;
                    }
                    left -= len;
                }
                let _ = writer.write_all(b"0\r\n\r\n").await;
                // Keep the write half open until the answer has been read.
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            let mut buffer = Vec::new();
            let response = read_split(&mut reader, &mut buffer).await?;
            sender.abort();
            if !protected {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let received = gate.received();
                if received.first().map(|r| r.body.len()) != Some(total) {
                    return Err(format!(
                        "the exchange must receive all {total} bytes, received {:?}",
                        received.iter().map(|r| r.body.len()).collect::<Vec<_>>()
                    ));
                }
                // The body was generated, so compare its length above, not its bytes below.
                return finish(gate, row, &response, None, user).await;
            }
            response
        }
        LimitAttack::DribbledBody | LimitAttack::StalledBody => {
            let mut stream = connect(gate).await?;
            let text = protected_head(user, "content-length: 35\r\n\r\n");
            write(&mut stream, text.as_bytes()).await?;
            let (mut reader, mut writer) = stream.into_split();
            let stall = matches!(row.attack, LimitAttack::StalledBody);
            let sender = tokio::spawn(async move {
                if stall {
                    let _ = writer.write_all(&WITHDRAW[..17]).await;
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    return;
                }
                for byte in WITHDRAW {
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            let started = Instant::now();
            let mut buffer = Vec::new();
            let response = read_split(&mut reader, &mut buffer).await?;
            sender.abort();
            if started.elapsed() >= Duration::from_secs(35 / 5) {
                return Err(format!(
                    "the gate waited {:?}: as long as the whole dribble",
                    started.elapsed()
                ));
            }
            response
        }
        LimitAttack::PendingChanges { count } => {
            for n in 1..count {
                let response = change(gate, user, n).await?;
                gate.check(&Held, &response, None, user)
                    .map_err(|e| format!("change {n} of {count} must be held: {e}"))?;
            }
            let last = change(gate, user, count).await?;
            let result = finish(gate, row, &last, None, user).await;
            // Other users are not affected by this user's cap.
            let other = change(gate, &format!("{user}-other"), 1).await?;
            gate.check(&Held, &other, None, user)
                .map_err(|e| format!("another user's change must still be held: {e}"))?;
            return result;
        }
        LimitAttack::CeremonyStarts { count } => {
            for n in 1..count {
                let response = ceremony(gate, user).await?;
                if response.status != 200 {
                    return Err(format!("ceremony {n} of {count} must start: {response}"));
                }
            }
            let last = ceremony(gate, user).await?;
            let result = finish(gate, row, &last, None, user).await;
            let other = ceremony(gate, &format!("{user}-other")).await?;
            if other.status != 200 {
                return Err(format!("another user's ceremony must start: {other}"));
            }
            return result;
        }
    };
    finish(gate, row, &outcome, None, user).await
}

async fn finish(
    gate: &Gate,
    row: &LimitRow,
    response: &crate::helpers::RawResponse,
    sent: Option<&Sent>,
    user: &str,
) -> Result<(), String> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    match row.expect {
        LimitExpect::Outcome(expect) => gate.check(&expect, response, sent, user),
        LimitExpect::Disconnected { .. } => Err("not a disconnect row".into()),
    }
}

/// The stalled and dribbled heads: the gate must hang up on its own, in bounded time.
async fn disconnects(gate: &Gate, row: &LimitRow, user: &str, dribble: bool) -> Result<(), String> {
    let LimitExpect::Disconnected { after } = row.expect else {
        return Err("a disconnect attack needs a disconnect expectation".into());
    };
    let full = head(
        "PUT",
        "/api/v1/api-keys/k1",
        user,
        "content-type: application/json\r\nx-padding: slow-loris-slow-loris\r\ncontent-length: 35\r\n\r\n",
    );
    let stream = connect(gate).await?;
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let bytes = full.into_bytes();
    let head_len = bytes.len();
    let sender = tokio::spawn(async move {
        if dribble {
            // One byte every 150 ms: the whole head would take far longer than the timeout.
            for (sent, byte) in bytes.iter().enumerate() {
                if writer.write_all(&[*byte]).await.is_err() {
                    return sent;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            bytes.len()
        } else {
            let half = bytes.len() / 2;
            let _ = writer.write_all(&bytes[..half]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            half
        }
    });
    let closed = tokio::time::timeout(DISCONNECT_BOUND, async {
        let mut sink = [0u8; 1024];
        loop {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    let still_sending = !sender.is_finished();
    sender.abort();
    if closed.is_err() {
        return Err(format!(
            "the connection was still open after {DISCONNECT_BOUND:?}"
        ));
    }
    if elapsed < after {
        return Err(format!(
            "the connection closed after {elapsed:?}, before the timeout could act"
        ));
    }
    if dribble && !still_sending {
        return Err(format!(
            "the whole {head_len}-byte head was dribbled in before the gate hung up"
        ));
    }
    gate.saw_nothing()
}

async fn connect(gate: &Gate) -> Result<TcpStream, String> {
    TcpStream::connect(gate.addr)
        .await
        .map_err(|e| format!("connect: {e}"))
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))
}

async fn read(stream: &mut TcpStream) -> Result<crate::helpers::RawResponse, String> {
    tokio::time::timeout(Duration::from_secs(15), read_response(stream, false))
        .await
        .map_err(|_| "no answer within 15 s".to_string())?
        .map_err(|e| format!("no answer: {e}"))
}

/// Reads one answer from the read half of a split stream.
async fn read_split(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    buffer: &mut Vec<u8>,
) -> Result<crate::helpers::RawResponse, String> {
    // Collect until the head and a Content-Length body are in, then parse with the shared
    // reader's rules; gate answers here are always Content-Length framed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(response) = parse_complete(buffer) {
            return Ok(response);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(left, reader.read(&mut chunk))
            .await
            .map_err(|_| "no answer within 15 s".to_string())?
            .map_err(|e| format!("read: {e} after {} bytes", buffer.len()))?;
        if n == 0 {
            return parse_complete(buffer).ok_or_else(|| {
                format!(
                    "the connection closed before a complete answer: {:?}",
                    String::from_utf8_lossy(buffer)
                )
            });
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn parse_complete(buffer: &[u8]) -> Option<crate::helpers::RawResponse> {
    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = buffer.get(end + 4..end + 4 + length)?.to_vec();
    Some(crate::helpers::RawResponse {
        status,
        headers,
        body,
    })
}

/// Holds change number `n` (a different key each time, so they are different changes).
async fn change(gate: &Gate, user: &str, n: usize) -> Result<crate::helpers::RawResponse, String> {
    let text = head(
        "PUT",
        &format!("/api/v1/api-keys/cap{n}"),
        user,
        "content-type: application/json\r\ncontent-length: 35\r\n\r\n",
    );
    let bytes = [text.as_bytes(), WITHDRAW].concat();
    exchange(gate.addr, &bytes, false)
        .await
        .map_err(|e| format!("no answer: {e}"))
}

async fn ceremony(gate: &Gate, user: &str) -> Result<crate::helpers::RawResponse, String> {
    let text = head(
        "POST",
        "/_stepgate/api/passkeys/register/start",
        user,
        "content-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    );
    exchange(gate.addr, text.as_bytes(), false)
        .await
        .map_err(|e| format!("no answer: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_attacks() {
    let gate = Gate::start().await;
    let mut failures = Vec::new();
    for (index, row) in ROWS.iter().enumerate() {
        let user = format!("limits-{index}");
        if let Err(why) = run_limit_row(&gate, row, &user).await {
            failures.push(format!("  [limits] {}: {why}", row.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} limits rows failed:\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n")
    );
    eprintln!("limits: all {} rows passed", ROWS.len());
}
