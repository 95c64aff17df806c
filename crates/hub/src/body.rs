//! Request bodies: `Content-Encoding` (gzip, zstd) under a size limit that
//! also bounds the decompressed size, and splitting into events: a JSON
//! array or NDJSON.

use std::borrow::Cow;
use std::io::Read;

/// Why a body was refused as a whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over the size limit (413).
    TooLarge(usize),
    /// Unsupported or corrupt encoding, or not JSON at all (400).
    Bad(String),
    /// More events than allowed in one request (400).
    TooManyEvents(usize),
    /// The decompressed bytes do not fit in `memory.requests_bytes` beside
    /// the other requests in flight (503).
    NoRoom,
}

/// Decompressed bytes are read in steps of this many, each held (see
/// [`decode`]'s `room`) before it is read.
const STEP: usize = 256 << 10;

/// Decompress `body` per `encoding`, refusing more than `limit` bytes.
/// An unencoded body is borrowed, not copied. Before each step of
/// decompressed bytes, `room` is asked to hold the output's size after
/// it; when it cannot, decompression stops with [`BodyError::NoRoom`].
///
/// # Errors
/// [`BodyError::TooLarge`], [`BodyError::Bad`] or [`BodyError::NoRoom`].
pub fn decode<'a>(
    body: &'a [u8],
    encoding: Option<&str>,
    limit: usize,
    room: &mut dyn FnMut(usize) -> bool,
) -> Result<Cow<'a, [u8]>, BodyError> {
    let mut out = Vec::new();
    let mut read = |r: &mut dyn Read, out: &mut Vec<u8>| -> Result<(), BodyError> {
        let mut r = r.take(limit as u64 + 1);
        loop {
            let want = (out.len() + STEP).min(limit + 1);
            if !room(want.min(limit)) {
                return Err(BodyError::NoRoom);
            }
            out.reserve_exact(want - out.len());
            let n = (&mut r)
                .take((want - out.len()) as u64)
                .read_to_end(out)
                .map_err(|e| BodyError::Bad(format!("cannot decompress the body: {e}")))?;
            if out.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            if n == 0 || out.len() < want {
                return Ok(());
            }
        }
    };
    // Content codings are case-insensitive (RFC 9110, 8.4.1).
    let coding = encoding.map(|e| e.trim().to_ascii_lowercase());
    match coding.as_deref() {
        None | Some("" | "identity") => {
            if body.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            return Ok(Cow::Borrowed(body));
        }
        // Every member: concatenated gzip files are one gzip stream (RFC 1952).
        Some("gzip" | "x-gzip") => read(&mut flate2::read::MultiGzDecoder::new(body), &mut out)?,
        Some("zstd") => {
            let mut d = zstd::stream::read::Decoder::new(body).map_err(|e| BodyError::Bad(e.to_string()))?;
            read(&mut d, &mut out)?;
        }
        Some(other) => {
            return Err(BodyError::Bad(format!("unsupported Content-Encoding {other:?}; use gzip or zstd")))
        }
    }
    Ok(Cow::Owned(out))
}

/// How a body's events are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// The body's shape decides: a JSON array, one JSON object, or NDJSON
    /// (`application/json`, the `+json` types, or no `Content-Type`).
    #[default]
    Shape,
    /// NDJSON, as the request's `Content-Type` declares: every non-blank
    /// line is one event, whatever it holds. A line that is an array is
    /// then one refused event, not the body's events (a client counting
    /// lines, as `send` does, gets back the indexes it counted).
    Lines,
}

/// Split a body into event byte ranges. With [`Framing::Shape`], a body
/// starting with `[` is a JSON array (it must be well-formed: 400
/// otherwise); a body that is one JSON object, on one line or across many
/// (a pretty-printed event, a structured-mode CloudEvent), is one event;
/// JSON objects one after another whose first does not end its line
/// (`jq .`'s output, pretty-printed; Kinesis Firehose's, with nothing
/// between them) are one event each, when the whole body is such objects
/// and whitespace; anything else is NDJSON, one event per non-empty line
/// (a bad line is that event's problem), unless a line is not an object
/// and the whole body is objects (a first event on one line, the next
/// ones pretty-printed): then it is one event per object. With [`Framing::Lines`] it is
/// NDJSON whatever its shape. A UTF-8 byte order mark at the start of the body (as some
/// Windows tools write files) is ignored, as RFC 8259 allows.
///
/// A body that is still gzip or zstd data (its `Content-Encoding` did not
/// say so, or it was compressed twice) is refused as a whole: no JSON text
/// starts with those bytes, and its lines would only be so many
/// `malformed_json` dead letters.
///
/// # Errors
/// [`BodyError::Bad`] for a broken array or a compressed body,
/// [`BodyError::TooManyEvents`].
pub fn split(body: &[u8], max_events: usize, framing: Framing) -> Result<Vec<&[u8]>, BodyError> {
    for (magic, coding) in [(&b"\x1f\x8b"[..], "gzip"), (&b"\x28\xb5\x2f\xfd"[..], "zstd")] {
        if body.starts_with(magic) {
            return Err(BodyError::Bad(format!(
                "the body is {coding}-compressed data, not JSON: send it with Content-Encoding: {coding} \
                 (once)"
            )));
        }
    }
    let body = body.strip_prefix(BOM).unwrap_or(body);
    let start = body.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(body.len());
    let events = if framing == Framing::Shape && body.get(start) == Some(&b'[') {
        split_array(&body[start..])?
    } else if framing == Framing::Shape && one_object(&body[start..]) {
        vec![trim(&body[start..])]
    } else if let Some(objects) = (framing == Framing::Shape).then(|| concatenated(&body[start..])).flatten()
    {
        objects
    } else {
        let mut out = Vec::with_capacity(memchr::memchr_iter(b'\n', body).count() + 1);
        let mut at = 0;
        for end in memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len())) {
            let line = &body[at..end];
            at = end + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                out.push(line);
            }
        }
        // A line that is no object (`  "id": "e-2",`): objects after a
        // first one-line object pretty-printed. Split by objects when the
        // whole body is objects; a body with a bad line stays NDJSON.
        let object_line = |l: &[u8]| {
            let l = l.trim_ascii();
            l.first() == Some(&b'{') && l.last() == Some(&b'}')
        };
        if framing == Framing::Shape && !out.iter().all(|l| object_line(l)) {
            objects(&body[start..]).unwrap_or(out)
        } else {
            out
        }
    };
    if events.len() > max_events {
        return Err(BodyError::TooManyEvents(max_events));
    }
    Ok(events)
}

/// The UTF-8 byte order mark.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Find the elements of a JSON array by scanning brackets and strings.
/// Elements themselves are checked later, one by one.
fn split_array(b: &[u8]) -> Result<Vec<&[u8]>, BodyError> {
    let bad = |what: &str| BodyError::Bad(format!("the body is not a JSON array: {what}"));
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut strings = Strings::default();
    let mut elem_start: Option<usize> = None;
    let mut closed = None;
    for (i, &c) in b.iter().enumerate().skip(1) {
        if !strings.outside(c) {
            continue;
        }
        match c {
            b'"' => {
                elem_start.get_or_insert(i);
            }
            b'{' | b'[' => {
                depth += 1;
                elem_start.get_or_insert(i);
            }
            b'}' | b']' if depth > 0 => depth -= 1,
            b']' => {
                if let Some(s) = elem_start.take() {
                    out.push(trim(&b[s..i]));
                } else if !out.is_empty() {
                    return Err(bad("a trailing comma"));
                }
                closed = Some(i);
                break;
            }
            b',' if depth == 0 => match elem_start.take() {
                Some(s) => out.push(trim(&b[s..i])),
                None => return Err(bad("an empty element")),
            },
            c if c.is_ascii_whitespace() => {}
            _ => {
                elem_start.get_or_insert(i);
            }
        }
    }
    let Some(end) = closed else {
        return Err(bad("it is not closed"));
    };
    if b[end + 1..].iter().any(|c| !c.is_ascii_whitespace()) {
        return Err(bad("text after the closing bracket"));
    }
    Ok(out)
}

/// Where a byte of JSON text stands: inside a string or not.
#[derive(Debug, Default)]
pub struct Strings {
    in_str: bool,
    esc: bool,
}

impl Strings {
    /// Whether the last byte taken left the text inside a string.
    #[must_use]
    pub fn inside(&self) -> bool {
        self.in_str
    }

    /// Take the next byte: true when it is outside any string (structure,
    /// or the quote that opens a string), false inside one (including the
    /// closing quote).
    pub fn outside(&mut self, c: u8) -> bool {
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if c == b'\\' {
                self.esc = true;
            } else if c == b'"' {
                self.in_str = false;
            }
            return false;
        }
        self.in_str = c == b'"';
        true
    }
}

/// Whether `b` is one JSON object and nothing else but whitespace: its
/// opening brace is matched (outside strings) by a closing one after which
/// only whitespace follows. For NDJSON the scan stops at the end of the
/// first event, so the check costs one event's bytes.
fn one_object(b: &[u8]) -> bool {
    if b.first() != Some(&b'{') {
        return false;
    }
    let (mut depth, mut strings) = (0usize, Strings::default());
    for (i, &c) in b.iter().enumerate() {
        if !strings.outside(c) {
            continue;
        }
        match c {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return b[i + 1..].iter().all(u8::is_ascii_whitespace);
                }
            }
            _ => {}
        }
    }
    false
}

/// The objects of `b` when it is JSON objects one after another with only
/// whitespace around them (braces and brackets balanced, outside
/// strings), and its first object does not end its line: the body is not
/// NDJSON. `None` otherwise: NDJSON (whose first line is one object) is
/// not scanned whole, and a body with anything else (a bad line) is left
/// to line splitting, where a bad line is one refused event.
fn concatenated(b: &[u8]) -> Option<Vec<&[u8]>> {
    let line = memchr::memchr(b'\n', b).map_or(b, |n| &b[..n]);
    if one_object(line) {
        return None;
    }
    objects(b)
}

/// The objects of `b` when it is JSON objects one after another with only
/// whitespace around them (braces and brackets balanced, outside
/// strings); `None` otherwise.
fn objects(b: &[u8]) -> Option<Vec<&[u8]>> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut strings, mut start) = (0usize, Strings::default(), 0);
    let mut out = Vec::new();
    for (i, &c) in b.iter().enumerate() {
        if !strings.outside(c) {
            continue;
        }
        match c {
            b'{' | b'[' => {
                if depth == 0 {
                    if c == b'[' {
                        return None;
                    }
                    start = i;
                }
                depth += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    out.push(&b[start..=i]);
                }
            }
            c if depth == 0 && !c.is_ascii_whitespace() => return None,
            _ => {}
        }
    }
    (depth == 0 && !strings.in_str).then_some(out)
}

fn trim(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_ndjson() {
        let a = br#" [ {"a":"],\"x"} , {"b":[1,2]} ,3 ] "#;
        let got = split(a, 10, Framing::Shape).unwrap();
        assert_eq!(got, vec![&br#"{"a":"],\"x"}"#[..], br#"{"b":[1,2]}"#, b"3"]);
        assert_eq!(split(b"[]", 10, Framing::Shape).unwrap().len(), 0);
        assert!(matches!(split(b"[1,2", 10, Framing::Shape), Err(BodyError::Bad(_))));
        assert!(matches!(split(b"[1,]", 10, Framing::Shape), Err(BodyError::Bad(_))));
        assert!(matches!(split(b"[1] x", 10, Framing::Shape), Err(BodyError::Bad(_))));
        let n = b"{\"a\":1}\r\n\n  \n{bad\n";
        assert_eq!(split(n, 10, Framing::Shape).unwrap(), vec![&b"{\"a\":1}"[..], b"{bad"]);
        assert_eq!(split(b"1\n2\n3", 2, Framing::Shape), Err(BodyError::TooManyEvents(2)));
    }

    #[test]
    fn a_body_still_compressed_is_refused_as_a_whole() {
        let event = b"{\"id\":\"1\"}\n";
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, event).unwrap();
            e.finish().unwrap()
        };
        let zstd = zstd::bulk::compress(event, 1).unwrap();
        for (body, coding) in [(&gzip, "gzip"), (&zstd, "zstd")] {
            let Err(BodyError::Bad(why)) = split(body, 10, Framing::Shape) else {
                panic!("{coding} accepted")
            };
            assert!(why.contains(&format!("send it with Content-Encoding: {coding}")), "{why}");
            // Decoded once, it splits; compressed twice, it is refused again.
            let once = decode(body, Some(coding), 1 << 20, &mut |_| true).unwrap();
            assert_eq!(split(&once, 10, Framing::Shape).unwrap(), [&event[..event.len() - 1]]);
        }
        let twice = zstd::bulk::compress(&zstd, 1).unwrap();
        let once = decode(&twice, Some("zstd"), 1 << 20, &mut |_| true).unwrap();
        assert!(matches!(split(&once, 10, Framing::Shape), Err(BodyError::Bad(_))));
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_ignored() {
        assert_eq!(
            split(b"\xEF\xBB\xBF{\"a\":1}\n{\"b\":2}\n", 10, Framing::Shape).unwrap(),
            vec![&b"{\"a\":1}"[..], b"{\"b\":2}"]
        );
        assert_eq!(split(b"\xEF\xBB\xBF [1,2]", 10, Framing::Shape).unwrap(), vec![&b"1"[..], b"2"]);
        assert_eq!(
            split(b"\xEF\xBB\xBF{\n\"a\": 1\n}", 10, Framing::Shape).unwrap(),
            vec![&b"{\n\"a\": 1\n}"[..]]
        );
        // Only at the start: elsewhere it is that event's problem.
        assert_eq!(
            split(b"{}\n\xEF\xBB\xBF{}", 10, Framing::Shape).unwrap(),
            vec![&b"{}"[..], b"\xEF\xBB\xBF{}"]
        );
    }

    #[test]
    fn one_object_across_lines_is_one_event() {
        let pretty = b"\n {\n  \"id\": \"a}\\\"{\",\n  \"detail\": {\"n\": [1, {\"x\": 2}]}\n}\r\n\n";
        assert_eq!(split(pretty, 10, Framing::Shape).unwrap(), vec![&pretty[2..pretty.len() - 3]]);
        // NDJSON, a first object with text after it, or one that never
        // closes: lines, each line its own event.
        assert_eq!(
            split(b"{\"a\":1}\n{\"b\":2}", 10, Framing::Shape).unwrap(),
            vec![&b"{\"a\":1}"[..], b"{\"b\":2}"]
        );
        assert_eq!(split(b"{\"a\":1} x", 10, Framing::Shape).unwrap(), vec![&b"{\"a\":1} x"[..]]);
        assert_eq!(split(b"{\"a\":\n1", 10, Framing::Shape).unwrap(), vec![&b"{\"a\":"[..], b"1"]);
        assert_eq!(split(b"{\"a\":\"}\n", 10, Framing::Shape).unwrap(), vec![&b"{\"a\":\"}"[..]]);
    }

    /// Declared NDJSON is lines whatever they hold: an array line is one
    /// event (refused later as not an envelope), and a pretty-printed
    /// object is as many events as it has lines.
    #[test]
    fn declared_ndjson_is_one_event_per_line() {
        let lines = |b: &'static [u8]| split(b, 10, Framing::Lines).unwrap();
        assert_eq!(lines(b"[1,2]\n{\"a\":1}\n"), vec![&b"[1,2]"[..], b"{\"a\":1}"]);
        assert_eq!(lines(b"\xEF\xBB\xBF[1,2]"), vec![&b"[1,2]"[..]]);
        assert_eq!(lines(b"{\n\"a\": 1\n}"), vec![&b"{"[..], b"\"a\": 1", b"}"]);
        assert_eq!(lines(b"{\"a\":1}\r\n\r\n  \n{\"b\":2}"), vec![&b"{\"a\":1}"[..], b"{\"b\":2}"]);
        assert_eq!(split(b"[1]\n[2]\n[3]", 2, Framing::Lines), Err(BodyError::TooManyEvents(2)));
        assert!(
            matches!(split(b"\x1f\x8b\x08", 10, Framing::Lines), Err(BodyError::Bad(_))),
            "still not gzip"
        );
    }

    #[test]
    fn decompression_is_bounded() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![b' '; 100_000]).unwrap();
        let body = gz.finish().unwrap();
        let any = &mut |_| true;
        assert_eq!(decode(&body, Some("gzip"), 1000, any), Err(BodyError::TooLarge(1000)));
        assert_eq!(decode(&body, Some("gzip"), 200_000, any).unwrap().len(), 100_000);
        let z = zstd::encode_all(&b"hello"[..], 1).unwrap();
        assert_eq!(&*decode(&z, Some("zstd"), 10, any).unwrap(), b"hello");
        assert_eq!(&*decode(&z, Some("zstd"), 5, any).unwrap(), b"hello", "exactly the limit");
        assert!(matches!(decode(b"x", Some("br"), 10, any), Err(BodyError::Bad(_))));
        assert_eq!(&*decode(&z, Some(" ZStd "), 10, any).unwrap(), b"hello", "case-insensitive");
        assert_eq!(decode(&body, Some("GZIP"), 200_000, any).unwrap().len(), 100_000);
        assert!(matches!(decode(b"not gzip", Some("gzip"), 10, any), Err(BodyError::Bad(_))));
    }

    /// Objects one after another, pretty-printed or with nothing between
    /// them, are one event each, also after a first one-line object;
    /// NDJSON and anything else stay lines.
    #[test]
    fn objects_one_after_another_are_one_event_each() {
        let shape = |b: &'static [u8]| split(b, 100, Framing::Shape).unwrap();
        // jq's pretty output, and Firehose's objects with nothing between.
        assert_eq!(
            shape(b"{\n  \"a\": 1\n}\n{\n  \"b\": \"}{\"\n}\n"),
            [&b"{\n  \"a\": 1\n}"[..], b"{\n  \"b\": \"}{\"\n}"]
        );
        assert_eq!(
            shape(b"{\"a\":1}{\"b\":[2]} {\"c\":{}}"),
            [&b"{\"a\":1}"[..], b"{\"b\":[2]}", b"{\"c\":{}}"]
        );
        // A first event on one line and the next pretty-printed: objects.
        assert_eq!(
            shape(b"{\"a\":1}\n{\n  \"b\":\n2}\n{\"c\":3}\n"),
            [&b"{\"a\":1}"[..], b"{\n  \"b\":\n2}", b"{\"c\":3}"]
        );
        // NDJSON stays lines, a bad line its own event, where the body is
        // not objects alone.
        assert_eq!(shape(b"{\"a\":1}\n{\"b\":\n"), [&b"{\"a\":1}"[..], b"{\"b\":"]);
        assert_eq!(shape(b"{\"a\":1}\n[2]\n{\"c\":3}\n"), [&b"{\"a\":1}"[..], b"[2]", b"{\"c\":3}"]);
        // Anything but objects and whitespace: lines.
        assert_eq!(shape(b"{\n\"a\":1\n}\nnull\n"), [&b"{"[..], b"\"a\":1", b"}", b"null"]);
        assert_eq!(shape(b"{\n\"a\":1\n}}\n"), [&b"{"[..], b"\"a\":1", b"}}"]);
        assert_eq!(shape(b"{\n\"a\":\"1\n}\n"), [&b"{"[..], b"\"a\":\"1", b"}"], "a string left open");
        assert_eq!(shape(b"{\n\"a\":1\n"), [&b"{"[..], b"\"a\":1"], "an object left open");
        assert_eq!(
            split(b"{\n\"a\":1\n}\n{}", 100, Framing::Lines).unwrap().len(),
            4,
            "declared NDJSON: lines"
        );
    }

    /// A gzip body may hold several members and a zstd body several
    /// frames (what concatenating compressed files makes): every one is
    /// read, never only the first; bytes after the last that are not
    /// another member are refused, not ignored.
    #[test]
    fn every_member_and_frame_is_read() {
        use std::io::Write;
        let gzip = |text: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(text).unwrap();
            gz.finish().unwrap()
        };
        let any = &mut |_| true;
        let body = [gzip(b"{\"a\":1}\n"), gzip(b"{\"b\":2}\n"), gzip(b"{\"c\":3}\n")].concat();
        assert_eq!(&*decode(&body, Some("gzip"), 100, any).unwrap(), b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        assert_eq!(
            decode(&body, Some("gzip"), 20, any),
            Err(BodyError::TooLarge(20)),
            "bounded across members"
        );
        let trailing = [gzip(b"{}\n"), b"garbage".to_vec()].concat();
        assert!(matches!(decode(&trailing, Some("gzip"), 100, any), Err(BodyError::Bad(_))));

        let z = |text: &[u8]| zstd::encode_all(text, 1).unwrap();
        let body = [z(b"{\"a\":1}\n"), z(b"{\"b\":2}\n")].concat();
        assert_eq!(&*decode(&body, Some("zstd"), 100, any).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        let trailing = [z(b"{}\n"), b"garbage".to_vec()].concat();
        assert!(matches!(decode(&trailing, Some("zstd"), 100, any), Err(BodyError::Bad(_))));
    }

    #[test]
    fn decompression_asks_for_room_before_each_step() {
        use std::io::Write;
        let text = vec![b'x'; 3 * STEP + 10];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&text).unwrap();
        let body = gz.finish().unwrap();
        let mut asked = Vec::new();
        let out = decode(&body, Some("gzip"), 10 * STEP, &mut |n| {
            asked.push(n);
            true
        })
        .unwrap();
        assert_eq!(out.len(), text.len());
        assert_eq!(asked, vec![STEP, 2 * STEP, 3 * STEP, 4 * STEP], "held ahead of each step");
        let mut left = 2;
        let r = decode(&body, Some("gzip"), 10 * STEP, &mut |_| {
            left -= 1;
            left >= 0
        });
        assert_eq!(r, Err(BodyError::NoRoom), "stops when the room runs out");
        assert_eq!(
            decode(b"{}", None, 10, &mut |_| false).unwrap().len(),
            2,
            "unencoded bodies are held already"
        );
    }
}
