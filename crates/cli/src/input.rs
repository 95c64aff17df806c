//! The events of `send`'s input, whatever its shape: NDJSON (one event
//! per line), a JSON array (or several, one after another), or JSON
//! values one after another (`jq .`'s pretty output, objects with
//! nothing between them). Each event comes out as one line of bytes, for
//! NDJSON request bodies.
//!
//! NDJSON lines are sent as they are: a line that is not an event is the
//! hub's to reject, by its index, and the send goes on. A JSON document
//! has no lines to fall back on: once its text is not JSON, where the
//! next event starts is unknown, so the send stops there, naming the
//! event and its line.

use std::io::{BufRead, BufReader, Cursor, Read};

use anyhow::Context as _;
use serde::de::IgnoredAny;
use watershed_hub::body::Strings;

/// A byte order mark (some Windows tools write one): not part of the
/// first event.
const BOM: &[u8] = watershed_hub::body::BOM;

/// How far past its first line a first event that does not end on it
/// is read to find its end; a longer one is read as NDJSON's first line.
const PROBE_BYTES: u64 = 64 << 20;

/// The input's shape, decided by its first non-blank line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One event per line.
    Lines,
    /// A JSON array of events (arrays one after another too).
    Array,
    /// JSON values one after another, separated by whitespace or not.
    Values,
}

impl Shape {
    /// How the shape is named in messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Shape::Lines => "NDJSON",
            Shape::Array => "a JSON array",
            Shape::Values => "JSON objects one after another",
        }
    }
}

/// The input's events, in order.
pub(crate) struct Events {
    inner: Inner,
}

enum Inner {
    Lines(std::io::Split<BufReader<Box<dyn Read>>>),
    Json(Scanner<BufReader<Box<dyn Read>>>),
}

impl Events {
    /// The events of `input`, its shape decided by how it starts: `[`
    /// begins a JSON array; `{` begins NDJSON when its line holds one
    /// JSON value and nothing else, and JSON values when that value ends
    /// on a later line (a pretty-printed object) or another follows it
    /// on the line; anything else is NDJSON, as is a `{` that does not
    /// begin a JSON value within [`PROBE_BYTES`]. Only what deciding
    /// needs is read (not a whole first line, which in a compact array
    /// is the whole file), and nothing read is lost: it is read again as
    /// the events.
    ///
    /// # Errors
    /// An I/O error reading the input.
    pub(crate) fn of(input: Box<dyn Read>) -> std::io::Result<(Shape, Self)> {
        let mut head = BufReader::new(Recording { inner: input, seen: Vec::new() });
        if head.fill_buf()?.starts_with(BOM) {
            head.consume(BOM.len());
        }
        let first = loop {
            match head.fill_buf()?.first().copied() {
                Some(b) if is_ws(b) => head.consume(1),
                other => break other,
            }
        };
        let shape = match first {
            Some(b'[') => Shape::Array,
            Some(b'{') => {
                let mut probe = Scanner::new(BufReader::new((&mut head).take(PROBE_BYTES)), false);
                match probe.next_value() {
                    // One value alone on its line is an NDJSON line.
                    Ok(Some(_)) if probe.line == 1 && probe.rest_of_line_is_blank().unwrap_or(false) => {
                        Shape::Lines
                    }
                    Ok(Some(_)) => Shape::Values,
                    _ => Shape::Lines,
                }
            }
            _ => Shape::Lines,
        };
        // Everything read so far, and the rest.
        let Recording { inner, mut seen } = head.into_inner();
        if seen.starts_with(BOM) {
            seen.drain(..BOM.len());
        }
        let whole: Box<dyn Read> = Box::new(Cursor::new(seen).chain(inner));
        let reader = BufReader::new(whole);
        let inner = match shape {
            Shape::Lines => Inner::Lines(reader.split(b'\n')),
            Shape::Array => Inner::Json(Scanner::new(reader, true)),
            Shape::Values => Inner::Json(Scanner::new(reader, false)),
        };
        Ok((shape, Self { inner }))
    }
}

impl Iterator for Events {
    /// One event's bytes, without a line break.
    type Item = anyhow::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Lines(lines) => loop {
                match lines.next()? {
                    Ok(line) if blank(&line) => {}
                    Ok(line) => return Some(Ok(line)),
                    Err(e) => return Some(Err(e.into())),
                }
            },
            Inner::Json(scanner) => {
                if scanner.failed {
                    return None;
                }
                let next = scanner.next_value();
                // Past a break, where the next event starts is unknown.
                scanner.failed = next.is_err();
                next.transpose()
            }
        }
    }
}

/// Whether an NDJSON line holds no event.
pub(crate) fn blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// A reader that keeps a copy of every byte read through it.
struct Recording {
    inner: Box<dyn Read>,
    seen: Vec<u8>,
}

impl Read for Recording {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Where a [`Scanner`] is in its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before an array's `[` (or between values, for values).
    Outside,
    /// After an array's `[`: an event or `]`.
    Opened,
    /// After an event of an array: `,` or `]`.
    AfterEvent,
}

/// Splits a JSON text into its events, reading as it goes: the elements
/// of a top-level array (or of several), or the top-level values.
struct Scanner<R> {
    input: R,
    array: bool,
    at: At,
    /// Line of the next byte (1-based), for messages.
    line: u64,
    /// Events read so far.
    index: usize,
    /// An error was returned: nothing follows it.
    failed: bool,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl<R: BufRead> Scanner<R> {
    fn new(input: R, array: bool) -> Self {
        Self { input, array, at: At::Outside, line: 1, index: 0, failed: false }
    }

    fn peek(&mut self) -> anyhow::Result<Option<u8>> {
        Ok(self.input.fill_buf()?.first().copied())
    }

    fn bump(&mut self, b: u8) {
        self.input.consume(1);
        if b == b'\n' {
            self.line += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    fn skip_ws(&mut self) -> anyhow::Result<Option<u8>> {
        loop {
            match self.peek()? {
                Some(b) if is_ws(b) => self.bump(b),
                other => return Ok(other),
            }
        }
    }

    /// Whether nothing but whitespace is left before the next line break
    /// (or the end).
    fn rest_of_line_is_blank(&mut self) -> anyhow::Result<bool> {
        loop {
            match self.peek()? {
                None | Some(b'\n') => return Ok(true),
                Some(b) if is_ws(b) => self.bump(b),
                Some(_) => return Ok(false),
            }
        }
    }

    /// The next event, compacted to one line; `None` at the input's end.
    fn next_value(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            let next = self.skip_ws()?;
            match (self.at, next) {
                (At::Outside, None) => return Ok(None),
                (At::Outside, Some(b'[')) if self.array => {
                    self.bump(b'[');
                    self.at = At::Opened;
                }
                (At::Outside, Some(b)) if self.array => anyhow::bail!(
                    "line {}: {:?} after the JSON array's end, where only another array may start",
                    self.line,
                    char::from(b)
                ),
                (At::Opened, Some(b']')) | (At::AfterEvent, Some(b']')) => {
                    self.bump(b']');
                    self.at = At::Outside;
                }
                (At::AfterEvent, Some(b',')) => {
                    self.bump(b',');
                    if self.skip_ws()? == Some(b']') {
                        anyhow::bail!(
                            "line {}: a comma before the array's `]`, after event {}",
                            self.line,
                            self.index - 1
                        );
                    }
                    self.at = At::Opened;
                }
                (At::AfterEvent, Some(b)) => anyhow::bail!(
                    "line {}: {:?} after event {}, where a comma or the array's `]` belongs",
                    self.line,
                    char::from(b),
                    self.index - 1
                ),
                (At::Opened | At::AfterEvent, None) => {
                    anyhow::bail!("the input ends inside a JSON array, before its `]`")
                }
                (At::Opened, Some(_)) | (At::Outside, Some(_)) => {
                    let value = self.value()?;
                    if self.array {
                        self.at = At::AfterEvent;
                    }
                    return Ok(Some(value));
                }
            }
        }
    }

    /// One value from the next byte on: checked to be JSON, then with
    /// the whitespace outside its strings taken out.
    fn value(&mut self) -> anyhow::Result<Vec<u8>> {
        let (line, index) = (self.line, self.index);
        let mut raw = Vec::new();
        let (mut depth, mut strings) = (0usize, Strings::default());
        while let Some(b) = self.peek()? {
            if !strings.outside(b) {
                self.bump(b);
                raw.push(b);
                // A string's closing quote ends a value that is a string.
                if depth == 0 && !strings.inside() {
                    break;
                }
                continue;
            }
            match b {
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => break,
                b'}' | b']' => depth -= 1,
                b',' if depth == 0 => break,
                b if is_ws(b) && depth == 0 => break,
                _ => {}
            }
            self.bump(b);
            raw.push(b);
            if depth == 0 && matches!(b, b'}' | b']') {
                break;
            }
        }
        if raw.is_empty() {
            let found = self.peek()?.map_or("the end".to_owned(), |b| format!("{:?}", char::from(b)));
            anyhow::bail!("line {line}: {found} where event {index} should start");
        }
        serde_json::from_slice::<IgnoredAny>(&raw)
            .with_context(|| format!("event {index} (from line {line}) is not JSON"))?;
        self.index += 1;
        Ok(compact(&raw))
    }
}

/// `json` without the whitespace outside its strings (it is JSON: the
/// rest means the same).
pub(crate) fn compact(json: &[u8]) -> Vec<u8> {
    let mut strings = Strings::default();
    json.iter().copied().filter(|&b| !strings.outside(b) || !is_ws(b)).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::{Events, Shape};

    fn read(input: &[u8]) -> (Shape, Vec<anyhow::Result<Vec<u8>>>) {
        let (shape, events) = Events::of(Box::new(std::io::Cursor::new(input.to_vec()))).unwrap();
        (shape, events.collect())
    }

    /// The events as text, stopping at the first error (its message last).
    fn texts(input: &str) -> (Shape, Vec<String>) {
        let (shape, events) = read(input.as_bytes());
        let mut out = Vec::new();
        for e in events {
            match e {
                Ok(b) => out.push(String::from_utf8(b).unwrap()),
                Err(e) => {
                    out.push(format!("error: {e:#}"));
                    break;
                }
            }
        }
        (shape, out)
    }

    #[test]
    fn each_shape_gives_its_events_one_per_line() {
        let lines = "{\"a\": 1}\n\n  \n{\"b\":2}\r\nnot json\n";
        assert_eq!(
            texts(lines),
            (Shape::Lines, vec!["{\"a\": 1}".into(), "{\"b\":2}\r".into(), "not json".into()])
        );
        let array = "[\n  {\"a\": 1},\n  {\"b\": [2, 3], \"c\": \"x y\"}\n]\n";
        assert_eq!(
            texts(array),
            (Shape::Array, vec!["{\"a\":1}".into(), "{\"b\":[2,3],\"c\":\"x y\"}".into()])
        );
        let two_arrays = "[{\"a\":1}]\n[{\"b\":2}, {\"c\":3}]";
        assert_eq!(texts(two_arrays).1, ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        assert_eq!(texts("[]\n"), (Shape::Array, vec![]));
        let pretty = "{\n  \"a\": 1\n}\n{\n  \"b\": {\"c\": \"}\\\" ,]\"}\n}\n";
        assert_eq!(
            texts(pretty),
            (Shape::Values, vec!["{\"a\":1}".into(), "{\"b\":{\"c\":\"}\\\" ,]\"}}".into()])
        );
        assert_eq!(
            texts("{\"a\":1}{\"b\":2}"),
            (Shape::Values, vec!["{\"a\":1}".into(), "{\"b\":2}".into()])
        );
        assert_eq!(texts("{\"a\":1} {\"b\":2}\n{\"c\":3}").1, ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        assert_eq!(texts("\u{feff}{\n\"a\": 1}").1, ["{\"a\":1}"], "behind a byte order mark");
        assert_eq!(texts("").1, Vec::<String>::new());
    }

    /// Deciding the shape reads only what it needs: a compact array on
    /// one endless line is read event by event.
    #[test]
    fn the_shape_is_decided_without_reading_the_first_line_whole() {
        struct Endless(usize);
        impl std::io::Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                const EVENT: &[u8] = b"{\"a\":1},";
                for b in buf.iter_mut() {
                    *b = if self.0 == 0 { b'[' } else { EVENT[(self.0 - 1) % EVENT.len()] };
                    self.0 += 1;
                }
                Ok(buf.len())
            }
        }
        let (shape, events) = Events::of(Box::new(Endless(0))).unwrap();
        assert_eq!(shape, Shape::Array);
        let three: Vec<Vec<u8>> = events.take(3).map(Result::unwrap).collect();
        assert_eq!(three, [b"{\"a\":1}".to_vec(), b"{\"a\":1}".to_vec(), b"{\"a\":1}".to_vec()]);
    }

    /// A first line that begins an object which never becomes JSON is
    /// NDJSON's: each line is sent, for the hub to reject by its index.
    #[test]
    fn a_broken_first_line_is_read_as_ndjson() {
        assert_eq!(
            texts("{\"a\": \n{\"b\":2}\n"),
            (Shape::Lines, vec!["{\"a\": ".into(), "{\"b\":2}".into()])
        );
        assert_eq!(texts("{\"a\": 1\n").0, Shape::Lines);
    }

    /// A JSON document whose text stops being JSON stops the events there,
    /// naming the event and its line; the events before it are given.
    #[test]
    fn a_broken_document_stops_at_the_break_with_where() {
        let cases = [
            ("[{\"a\":1},\n{\"b\":}]", "event 1 (from line 2) is not JSON"),
            ("[{\"a\":1}\n{\"b\":2}]", "line 2: '{' after event 0, where a comma or the array's `]` belongs"),
            ("[{\"a\":1},\n", "the input ends inside a JSON array"),
            ("[{\"a\":1},]", "a comma before the array's `]`, after event 0"),
            ("[{\"a\":1}]\nx", "line 2: 'x' after the JSON array's end"),
            ("{\n\"a\":1}\n}", "line 3: '}' where event 1 should start"),
            ("{\n\"a\":1}\n{\"b\":", "event 1 (from line 3) is not JSON"),
            ("{\n\"a\":1}\n[1 2]", "event 1 (from line 3) is not JSON"),
        ];
        for (input, want) in cases {
            let (_, got) = texts(input);
            let last = got.last().unwrap();
            assert!(last.starts_with("error: ") && last.contains(want), "{input:?}: {got:?}");
            if input.contains("\"a\":1") {
                assert_eq!(got[0], "{\"a\":1}", "{input:?}");
            }
        }
    }

    fn event() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "[ -~\\n\\t{}\\[\\],\"\\\\é]{0,12}".prop_map(Value::from),
            Just(Value::Null),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z ]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        proptest::collection::btree_map("[a-z]{1,6}", value, 1..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the events, written as NDJSON, as a JSON array
        /// (compact or pretty, whole or in parts), or as objects one
        /// after another (pretty, or with nothing between), every event
        /// comes out once, in order, the same JSON, on one line.
        #[test]
        fn every_event_comes_out_once_in_order_whatever_the_shape(
            events in proptest::collection::vec(event(), 1..12),
            how in 0usize..5,
            bom in any::<bool>(),
        ) {
            let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap();
            let (text, shape) = match how {
                0 => (events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"), Shape::Lines),
                1 => (Value::from(events.clone()).to_string(), Shape::Array),
                2 => (pretty(&Value::from(events.clone())), Shape::Array),
                3 => {
                    let (a, b) = events.split_at(events.len() / 2);
                    (format!("{}\n{}", pretty(&Value::from(a.to_vec())), Value::from(b.to_vec())), Shape::Array)
                }
                _ => (events.iter().map(pretty).collect::<Vec<_>>().join(""), Shape::Values),
            };
            let mut input = if bom { "\u{feff}".to_owned() } else { String::new() };
            input.push_str(&text);
            let (got_shape, got) = read(input.as_bytes());
            prop_assert_eq!(got_shape, shape);
            let got: Vec<Value> = got
                .into_iter()
                .map(|e| {
                    let e = e.unwrap();
                    assert!(!e.contains(&b'\n'), "one line: {}", String::from_utf8_lossy(&e));
                    serde_json::from_slice(&e).unwrap()
                })
                .collect();
            prop_assert_eq!(got, events);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// A JSON document (an array, arrays or objects one after another)
        /// with a few bytes changed, inserted or taken out: when every
        /// event comes out without an error, serde_json reads the same
        /// events from it (the array's elements, or the values); when
        /// serde_json reads the whole document, no error comes out.
        #[test]
        fn a_damaged_document_is_read_as_serde_json_reads_it_or_stopped(
            events in proptest::collection::vec(event(), 1..5),
            how in 0usize..3,
            edits in proptest::collection::vec((any::<usize>(), 0u8..3, any::<prop::sample::Index>()), 1..4),
        ) {
            let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap();
            let mut doc = match how {
                0 => Value::from(events.clone()).to_string(),
                1 => pretty(&Value::from(events.clone())),
                _ => events.iter().map(pretty).collect::<Vec<_>>().join(""),
            }
            .into_bytes();
            for (at, how, piece) in &edits {
                let piece = piece.get(watershed_event::damage::PIECES);
                watershed_event::damage::apply(&mut doc, *at, *how, piece);
            }
            let (shape, got) = read(&doc);
            if shape == Shape::Lines {
                return Ok(()); // lines go as they are, for the hub to judge
            }
            let ours: Result<Vec<Vec<u8>>, String> =
                got.into_iter().map(|e| e.map_err(|e| format!("{e:#}"))).collect();
            let body = doc.strip_prefix(super::BOM).unwrap_or(&doc);
            let shown = String::from_utf8_lossy(&doc);
            // Where one event ends and the next begins is JSON's structure,
            // which serde_json reads without building values (as `send`
            // checks each event); what is inside a string or a number (a
            // lone surrogate, an exponent past f64's) is for the hub to
            // judge, event by event.
            let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<serde::de::IgnoredAny>();
            let structure = loop {
                let start = stream.byte_offset();
                match stream.next() {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.to_string()),
                    Some(Ok(_)) if shape == Shape::Array => {
                        let value = String::from_utf8_lossy(&body[start..stream.byte_offset()]);
                        if !value.trim_start().starts_with('[') {
                            break Err(format!("not an array: {value}"));
                        }
                    }
                    // A number or literal runs into what follows it
                    // (`1{`): serde_json's stream splits it, and `send`
                    // stops (only whitespace ends such a value).
                    Some(Ok(_)) => {
                        let value = body[start..stream.byte_offset()].trim_ascii_start();
                        let open = matches!(value.first(), Some(b'{' | b'[' | b'"'));
                        if !open && body.get(stream.byte_offset()).is_some_and(|b| !b.is_ascii_whitespace()) {
                            break Err(format!("a value runs into the next: {}", String::from_utf8_lossy(value)));
                        }
                    }
                }
            };
            match (&ours, &structure) {
                (Ok(_), Err(e)) => prop_assert!(false, "read, but serde_json refuses ({}): {}", e, shown),
                (Err(e), Ok(())) => prop_assert!(false, "stopped ({}), but serde_json reads: {}", e, shown),
                _ => {}
            }
            let values: Result<Vec<Value>, _> =
                serde_json::Deserializer::from_slice(body).into_iter::<Value>().collect();
            if let (Ok(ours), Ok(values)) = (ours, values) {
                let theirs: Vec<Value> = values
                    .into_iter()
                    .flat_map(|v| match (shape, v) {
                        (Shape::Array, Value::Array(items)) => items,
                        (_, v) => vec![v],
                    })
                    .collect();
                let ours: Vec<Value> = ours.iter().map(|e| serde_json::from_slice(e).unwrap()).collect();
                prop_assert_eq!(ours, theirs, "{}", shown);
            }
        }
    }

    #[test]
    fn nested_values_keep_their_strings_exactly() {
        let event = json!({"s": "a } b ] c , d \" e \\ f\tg", "n": [1, {"x": []}]});
        let (_, got) = texts(&serde_json::to_string_pretty(&json!([event])).unwrap());
        assert_eq!(serde_json::from_str::<Value>(&got[0]).unwrap(), event);
    }
}
