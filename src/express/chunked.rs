//! The chunked coding (RFC 9112 §7.1) of an upstream answer, read strictly so the end of the
//! answer is known exactly (the connection carries the next one), and written anew for the
//! client: data is passed on, chunk extensions and trailers are dropped.

/// Longest chunk-size line (digits, extensions) or trailer section accepted.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the digits (RFC 9112's BWS): only more of it, `;` or CR may follow.
    SizeSpace {
        value: u64,
        seen: usize,
    },
    /// After `;`: extensions, up to CR.
    Extension {
        value: u64,
        seen: usize,
    },
    /// CR seen after a size line: LF must follow.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one. `line` counts the current
    /// line's bytes, `total` the section's.
    Trailer {
        line: usize,
        total: usize,
    },
    TrailerLf {
        line: usize,
        total: usize,
    },
    Done,
}

#[derive(Debug, thiserror::Error)]
#[error("the answer's chunked body is malformed")]
pub struct Malformed;

pub struct Decoder {
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl Decoder {
    /// Whether the last chunk and the trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `input` as far as the body goes and appends the client's chunks for it to `out`
    /// (the last chunk too, once reached). Returns how many bytes of `input` were the body's:
    /// fewer than all only once done.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Malformed> {
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            self.state = match self.state {
                State::Size { value, digits } => match hex(byte) {
                    Some(digit) if digits < 15 => State::Size {
                        value: value << 4 | u64::from(digit),
                        digits: digits + 1,
                    },
                    None if digits > 0 && byte == b'\r' => State::SizeLf { value },
                    None if digits > 0 && byte == b';' => State::Extension { value, seen: 1 },
                    None if digits > 0 && matches!(byte, b' ' | b'\t') => {
                        State::SizeSpace { value, seen: 1 }
                    }
                    _ => return Err(Malformed),
                },
                State::SizeSpace { value, seen } => match byte {
                    b'\r' => State::SizeLf { value },
                    b';' => State::Extension {
                        value,
                        seen: seen + 1,
                    },
                    b' ' | b'\t' if seen < MAX_LINE => State::SizeSpace {
                        value,
                        seen: seen + 1,
                    },
                    _ => return Err(Malformed),
                },
                State::Extension { value, seen } => match byte {
                    b'\r' => State::SizeLf { value },
                    b'\n' => return Err(Malformed),
                    _ if seen >= MAX_LINE || (byte < 0x20 && byte != b'\t') || byte == 0x7f => {
                        return Err(Malformed)
                    }
                    _ => State::Extension {
                        value,
                        seen: seen + 1,
                    },
                },
                State::SizeLf { value } => match byte {
                    b'\n' if value == 0 => State::Trailer { line: 0, total: 0 },
                    b'\n' => State::Data { left: value },
                    _ => return Err(Malformed),
                },
                State::Data { left } => {
                    let available = (input.len() - at) as u64;
                    let take = left.min(available) as usize;
                    let data = &input[at..at + take];
                    out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                    at += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    };
                    continue;
                }
                State::DataCr => match byte {
                    b'\r' => State::DataLf,
                    _ => return Err(Malformed),
                },
                State::DataLf => match byte {
                    b'\n' => State::Size {
                        value: 0,
                        digits: 0,
                    },
                    _ => return Err(Malformed),
                },
                State::Trailer { line, total } => {
                    if total >= MAX_TRAILERS {
                        return Err(Malformed);
                    }
                    match byte {
                        b'\r' => State::TrailerLf { line, total },
                        b'\n' => return Err(Malformed),
                        _ => State::Trailer {
                            line: line + 1,
                            total: total + 1,
                        },
                    }
                }
                State::TrailerLf { line, total } => match byte {
                    b'\n' if line == 0 => {
                        out.extend_from_slice(b"0\r\n\r\n");
                        self.state = State::Done;
                        return Ok(at + 1);
                    }
                    b'\n' => State::Trailer {
                        line: 0,
                        total: total + 2,
                    },
                    _ => return Err(Malformed),
                },
                State::Done => return Ok(at),
            };
            at += 1;
        }
        Ok(at)
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Appends `data` to `out` as one chunk (an answer delimited by the upstream closing is sent
/// on chunked, so the client connection can carry the next request).
pub fn encode(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, with no trailers.
pub const LAST: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize, bool), Malformed> {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(piece) {
            let consumed = decoder.feed(part, &mut out)?;
            used += consumed;
            if decoder.is_done() {
                break;
            }
        }
        Ok((out, used, decoder.is_done()))
    }

    /// Decodes what `encode`/`feed` wrote, to compare the data.
    fn data_of(encoded: &[u8]) -> Vec<u8> {
        let mut decoder = Decoder::default();
        let mut again = Vec::new();
        decoder.feed(encoded, &mut again).expect("our own chunks");
        assert!(decoder.is_done(), "our own chunks end with the last chunk");
        let mut data = Vec::new();
        let mut rest = encoded;
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a size line");
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).expect("hex"), 16)
                    .expect("a size");
            rest = &rest[line_end + 2..];
            if size == 0 {
                return data;
            }
            data.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }

    #[test]
    fn a_chunked_body_is_read_to_its_exact_end_in_any_pieces() {
        let body =
            b"5;name=value\r\nhello\r\n6 \t;x\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nHTTP/1.1 200";
        for piece in 1..body.len() {
            let (out, used, done) = decode_in_pieces(body, piece).expect("well-formed");
            assert!(done, "piece size {piece}");
            assert_eq!(
                used,
                body.len() - b"HTTP/1.1 200".len(),
                "piece size {piece}"
            );
            assert_eq!(data_of(&out), b"hello world", "piece size {piece}");
        }
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        for bad in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXY0\r\n\r\n",
            b"\r\n",
            b"10000000000000000\r\n",
            b"5\r\nhello\r\n0\r\nbad\ntrailer\r\n\r\n",
            b"5;ext\nhello",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                decode_in_pieces(bad, bad.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        let (_, used, done) = decode_in_pieces(b"5\r\nhel", 64).expect("fine so far");
        assert_eq!(used, 6);
        assert!(!done);
    }

    #[test]
    fn encoded_chunks_carry_the_data() {
        let mut out = Vec::new();
        encode(b"abc", &mut out);
        encode(b"", &mut out);
        encode(&[b'z'; 300], &mut out);
        out.extend_from_slice(LAST);
        let mut expected = b"abc".to_vec();
        expected.extend_from_slice(&[b'z'; 300]);
        assert_eq!(data_of(&out), expected);
    }
}
