//! A small JSON scanner: it reads one token at a time from a byte slice,
//! borrowing strings that hold no escapes and checking UTF-8 only where a
//! non-ASCII byte appears. It knows nothing of schemas: the validator
//! drives it with one, and the hub reads event envelopes with it.

/// A number as written: integer when it has no fraction or exponent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num<'a> {
    /// An integer that fits i64.
    Int(i64),
    /// Any other number.
    Float {
        /// Its f64 value.
        value: f64,
        /// The literal as written.
        text: &'a str,
    },
}

/// Where the scanner failed, for `malformed_json` details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// What was expected or wrong.
    pub what: &'static str,
    /// The byte offset.
    pub at: usize,
}

/// A scanner result.
pub type Res<T> = Result<T, SyntaxError>;

/// The next value's kind, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Peek {
    Object,
    Array,
    String,
    Number,
    True,
    False,
    Null,
}

/// Whether `s` is all printable ASCII (no control characters, nothing
/// that needs a UTF-8 check): one branch-free pass the compiler
/// vectorises.
#[inline]
fn printable_ascii(s: &[u8]) -> bool {
    let mut odd = false;
    for &c in s {
        odd |= !(0x20..0x80).contains(&c);
    }
    !odd
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` (eight string bytes, little-endian)
/// that ends the fast path of a string: `"`, `\`, a control character or
/// a non-ASCII byte. The lowest flagged byte is exact (a borrow can only
/// flag bytes above a true one), which is all the caller uses.
#[inline]
fn stops(w: u64) -> u64 {
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let quote = zero(w ^ (ONES * u64::from(b'"')));
    let backslash = zero(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    quote | backslash | control | (w & HIGHS)
}

/// The length of the run of printable ASCII other than `"` and `\` at the
/// start of `s`, eight bytes at a time.
#[inline]
fn plain_run(s: &[u8]) -> usize {
    let mut i = 0;
    let mut words = s.chunks_exact(8);
    for chunk in &mut words {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let m = stops(w);
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + words
        .remainder()
        .iter()
        .take_while(|&&c| c != b'"' && c != b'\\' && (0x20..0x80).contains(&c))
        .count()
}

/// A pull scanner over one JSON document.
pub struct Scanner<'a> {
    b: &'a [u8],
    /// `b` as text, when the caller knows it is valid UTF-8 throughout:
    /// [`Scanner::cow`] then slices strings from it without a check.
    text: Option<&'a str>,
    /// The current byte offset.
    pub pos: usize,
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `b`.
    #[must_use]
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, text: None, pos: 0 }
    }

    /// A scanner at the start of `text`, whose strings need no UTF-8 check
    /// of their own.
    #[must_use]
    pub fn from_text(text: &'a str) -> Self {
        Self { b: text.as_bytes(), text: Some(text), pos: 0 }
    }

    /// A syntax error at the current position.
    ///
    /// # Errors
    /// Always.
    pub fn err<T>(&self, what: &'static str) -> Res<T> {
        Err(SyntaxError { what, at: self.pos })
    }

    /// Skip whitespace.
    #[inline]
    pub fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.pos) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// Skip whitespace and say what comes next.
    #[inline]
    pub fn peek(&mut self) -> Res<Peek> {
        self.ws();
        match self.b.get(self.pos) {
            Some(b'{') => Ok(Peek::Object),
            Some(b'[') => Ok(Peek::Array),
            Some(b'"') => Ok(Peek::String),
            Some(b'-' | b'0'..=b'9') => Ok(Peek::Number),
            Some(b't') => Ok(Peek::True),
            Some(b'f') => Ok(Peek::False),
            Some(b'n') => Ok(Peek::Null),
            Some(_) => self.err("expected a value"),
            None => self.err("unexpected end of input"),
        }
    }

    /// Consume `lit` (true, false, null) at the current position.
    pub fn literal(&mut self, lit: &'static [u8]) -> Res<()> {
        if self.b[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            Ok(())
        } else {
            self.err("invalid literal")
        }
    }

    /// Consume `c` after optional whitespace.
    #[inline]
    pub fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// After a member or element: `,` (true) or the closing `close` (false).
    #[inline]
    pub fn next_or_close(&mut self, close: u8) -> Res<bool> {
        self.ws();
        match self.b.get(self.pos) {
            Some(b',') => {
                self.pos += 1;
                Ok(true)
            }
            Some(&c) if c == close => {
                self.pos += 1;
                Ok(false)
            }
            _ => self.err(if close == b'}' { "expected ',' or '}'" } else { "expected ',' or ']'" }),
        }
    }

    /// The end of input, after whitespace.
    pub fn end(&mut self) -> Res<()> {
        self.ws();
        if self.pos == self.b.len() {
            Ok(())
        } else {
            self.err("trailing characters after the value")
        }
    }

    /// A string at the current position (which holds `"`), as UTF-8
    /// bytes (checked): borrowed when it has no escapes, otherwise
    /// unescaped into `scratch`. Most callers never need a `&str`.
    #[inline]
    pub fn bytes<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Res<&'s [u8]>
    where
        'a: 's,
    {
        self.pos += 1;
        let start = self.pos;
        let rest = &self.b[start..];
        // Most strings in events are printable ASCII: one pass, eight
        // bytes at a time, that stops at the closing quote or at anything
        // needing a closer look.
        let n = plain_run(rest);
        if rest.get(n) == Some(&b'"') {
            self.pos = start + n + 1;
            return Ok(&rest[..n]);
        }
        let Some(n) = memchr::memchr2(b'"', b'\\', rest) else { return self.err("unterminated string") };
        let s = &rest[..n];
        if !printable_ascii(s) {
            if s.iter().any(|&c| c < 0x20) {
                return self.err("control character in string");
            }
            if rest[n] != b'\\' && self.text.is_none() && std::str::from_utf8(s).is_err() {
                return self.err("invalid UTF-8 in string");
            }
        }
        if rest[n] == b'\\' {
            self.pos = start + n;
            return self.escaped(start, scratch).map(str::as_bytes);
        }
        self.pos = start + n + 1;
        Ok(s)
    }

    /// [`Scanner::bytes`] as a `&str`.
    #[inline]
    pub fn string<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Res<&'s str>
    where
        'a: 's,
    {
        self.bytes(scratch).map(|b| std::str::from_utf8(b).unwrap_or_default())
    }

    /// A string at the current position (which holds `"`), borrowed
    /// from the input when it has no escapes.
    ///
    /// # Errors
    /// A [`SyntaxError`] for a malformed string.
    pub fn cow(&mut self) -> Res<std::borrow::Cow<'a, str>> {
        let mut scratch = Vec::new();
        let start = self.pos + 1;
        let b = self.bytes(&mut scratch)?;
        // Unescaping always shortens a string: same length means borrowed.
        let owned = (b.len() != self.pos - start - 1).then(|| String::from_utf8_lossy(b).into_owned());
        Ok(match owned {
            Some(s) => std::borrow::Cow::Owned(s),
            None => std::borrow::Cow::Borrowed(match self.text {
                // Just inside the quotes: character boundaries.
                Some(t) => t.get(start..self.pos - 1).unwrap_or_default(),
                None => std::str::from_utf8(&self.b[start..self.pos - 1]).unwrap_or_default(),
            }),
        })
    }

    fn escaped<'s>(&mut self, start: usize, scratch: &'s mut Vec<u8>) -> Res<&'s str> {
        scratch.clear();
        scratch.extend_from_slice(&self.b[start..self.pos]);
        loop {
            let Some(&c) = self.b.get(self.pos) else { return self.err("unterminated string") };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.pos) else { return self.err("unterminated string") };
                    self.pos += 1;
                    match e {
                        b'"' | b'\\' | b'/' => scratch.push(e),
                        b'b' => scratch.push(8),
                        b'f' => scratch.push(12),
                        b'n' => scratch.push(b'\n'),
                        b'r' => scratch.push(b'\r'),
                        b't' => scratch.push(b'\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp) {
                                if self.b.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                    return self.err("lone surrogate in string");
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("lone surrogate in string");
                                }
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            } else if (0xDC00..0xE000).contains(&cp) {
                                return self.err("lone surrogate in string");
                            }
                            let ch = char::from_u32(cp)
                                .ok_or(SyntaxError { what: "invalid \\u escape", at: self.pos })?;
                            let mut buf = [0u8; 4];
                            scratch.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return self.err("invalid escape in string"),
                    }
                }
                0..=0x1f => return self.err("control character in string"),
                _ => scratch.push(c),
            }
        }
        std::str::from_utf8(scratch).or(Err(SyntaxError { what: "invalid UTF-8 in string", at: self.pos }))
    }

    fn hex4(&mut self) -> Res<u32> {
        let Some(h) = self.b.get(self.pos..self.pos + 4) else { return self.err("short \\u escape") };
        let mut v = 0u32;
        for &d in h {
            v = v * 16
                + char::from(d)
                    .to_digit(16)
                    .ok_or(SyntaxError { what: "invalid \\u escape", at: self.pos })?;
        }
        self.pos += 4;
        Ok(v)
    }

    /// Skip ASCII digits; how many there were.
    fn skip_digits(&mut self) -> usize {
        let start = self.pos;
        while self.b.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// A number at the current position, with JSON's grammar.
    #[inline]
    pub fn number(&mut self) -> Res<Num<'a>> {
        let start = self.pos;
        let neg = self.b.get(self.pos) == Some(&b'-');
        if neg {
            self.pos += 1;
        }
        let int_start = self.pos;
        let mut v: i64 = 0;
        let mut overflow = false;
        while let Some(&c) = self.b.get(self.pos) {
            if !c.is_ascii_digit() {
                break;
            }
            let d = i64::from(c - b'0');
            match v.checked_mul(10).and_then(|x| if neg { x.checked_sub(d) } else { x.checked_add(d) }) {
                Some(x) => v = x,
                None => overflow = true,
            }
            self.pos += 1;
        }
        let digits = self.pos - int_start;
        if digits == 0 || (digits > 1 && self.b[int_start] == b'0') {
            return self.err("invalid number");
        }
        let mut float = false;
        if self.b.get(self.pos) == Some(&b'.') {
            float = true;
            self.pos += 1;
            if self.skip_digits() == 0 {
                return self.err("invalid number");
            }
        }
        if matches!(self.b.get(self.pos), Some(b'e' | b'E')) {
            float = true;
            self.pos += 1;
            if matches!(self.b.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.skip_digits() == 0 {
                return self.err("invalid number");
            }
        }
        if !float && !overflow {
            return Ok(Num::Int(v));
        }
        let text = std::str::from_utf8(&self.b[start..self.pos]).unwrap_or_default();
        let value: f64 = text.parse().or_else(|_| self.err("invalid number"))?;
        Ok(Num::Float { value, text })
    }

    /// Skip one value of any type, at most `depth` levels deep.
    pub fn skip(&mut self, depth: u32, scratch: &mut Vec<u8>) -> Res<()> {
        if depth == 0 {
            return self.err("nesting too deep");
        }
        match self.peek()? {
            Peek::String => self.bytes(scratch).map(drop),
            Peek::Number => self.number().map(drop),
            Peek::True => self.literal(b"true"),
            Peek::False => self.literal(b"false"),
            Peek::Null => self.literal(b"null"),
            Peek::Array => {
                self.pos += 1;
                if self.eat(b']') {
                    return Ok(());
                }
                loop {
                    self.skip(depth - 1, scratch)?;
                    if !self.next_or_close(b']')? {
                        return Ok(());
                    }
                }
            }
            Peek::Object => {
                self.pos += 1;
                if self.eat(b'}') {
                    return Ok(());
                }
                loop {
                    self.key(scratch)?;
                    self.skip(depth - 1, scratch)?;
                    if !self.next_or_close(b'}')? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Consume the object key `name` and its `:` when they come next
    /// written exactly `"name":` (true); otherwise leave the position
    /// after any whitespace (false), for [`Scanner::key`]. `name` must
    /// need no escaping in JSON (Avro names never do).
    #[inline]
    pub fn key_eq(&mut self, name: &[u8]) -> bool {
        debug_assert!(!name.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20));
        self.ws();
        let (at, n) = (self.pos, name.len());
        let Some(w) = self.b.get(at..at + n + 3) else { return false };
        if w[0] == b'"' && w[n + 1] == b'"' && w[n + 2] == b':' && crate::node::short_eq(&w[1..=n], name) {
            self.pos = at + n + 3;
            true
        } else {
            false
        }
    }

    /// An object key and its `:`.
    #[inline]
    pub fn key<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Res<&'s [u8]>
    where
        'a: 's,
    {
        self.ws();
        if self.b.get(self.pos) != Some(&b'"') {
            return self.err("expected a string key");
        }
        let k = self.bytes(scratch)?;
        self.ws();
        if self.b.get(self.pos) != Some(&b':') {
            return Err(SyntaxError { what: "expected ':'", at: self.pos });
        }
        self.pos += 1;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(j: &str) -> Res<String> {
        let mut sc = Scanner::new(j.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(sc.peek()?, Peek::String);
        let v = sc.string(&mut buf)?.to_owned();
        sc.end()?;
        Ok(v)
    }

    #[test]
    fn strings() {
        assert_eq!(s(r#""plain""#).unwrap(), "plain");
        assert_eq!(s(r#""h\u00e9\n\"x\"""#).unwrap(), "hé\n\"x\"");
        assert_eq!(s(r#""\ud83d\ude00""#).unwrap(), "😀");
        assert_eq!(s("\"héllo\"").unwrap(), "héllo");
        assert!(s(r#""\ud83d""#).is_err());
        assert!(s("\"a\u{1}\"").is_err());
        assert!(s(r#""abc"#).is_err());
        assert!(s(r#""\q""#).is_err());
    }

    #[test]
    fn strings_from_known_text_are_sliced() {
        for j in ["\"h\u{e9}llo\"", "\"plain\""] {
            let want = Scanner::new(j.as_bytes()).cow().unwrap();
            let got = Scanner::from_text(j).cow().unwrap();
            assert!(matches!(got, std::borrow::Cow::Borrowed(_)));
            assert_eq!(got, want);
        }
        assert_eq!(Scanner::from_text(r#""a\nb""#).cow().unwrap(), "a\nb");
        assert!(Scanner::from_text("\"a\u{1}\"").cow().is_err(), "control characters still fail");
    }

    #[test]
    fn keys_matched_in_place() {
        let eq = |j: &str, name: &str| {
            let mut sc = Scanner::new(j.as_bytes());
            let hit = sc.key_eq(name.as_bytes());
            (hit, sc.pos)
        };
        assert_eq!(eq(r#" "amount":1"#, "amount"), (true, 10));
        // Anything but the exact spelling falls back to a full key read,
        // positioned after leading whitespace.
        assert_eq!(eq(r#" "amount" :1"#, "amount"), (false, 1));
        assert_eq!(eq(r#""amounts":1"#, "amount"), (false, 0));
        assert_eq!(eq(r#""amoun":1"#, "amount"), (false, 0));
        assert_eq!(eq(r#""am\u006funt":1"#, "amount"), (false, 0));
        assert_eq!(eq(r#""amount""#, "amount"), (false, 0));
        assert_eq!(eq(r#""a":"#, "a"), (true, 4));
    }

    #[test]
    fn numbers() {
        fn n(j: &str) -> Res<Num<'_>> {
            Scanner::new(j.as_bytes()).number()
        }
        assert_eq!(n("-12").unwrap(), Num::Int(-12));
        assert_eq!(n("9223372036854775807").unwrap(), Num::Int(i64::MAX));
        assert_eq!(n("-9223372036854775808").unwrap(), Num::Int(i64::MIN));
        assert!(matches!(n("9223372036854775808").unwrap(), Num::Float { .. }));
        assert!(matches!(n("1.5e3").unwrap(), Num::Float { value, .. } if value == 1500.0));
        for bad in ["01", "-", "1.", "1e", ".5"] {
            assert!(n(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn skipping() {
        let j = br#"{"a": [1, {"b": "\"x"}, null, true, false], "c": {}} "#;
        let mut sc = Scanner::new(j);
        sc.skip(10, &mut Vec::new()).unwrap();
        sc.end().unwrap();
        assert!(Scanner::new(b"[[[[1]]]]").skip(3, &mut Vec::new()).is_err());
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// Up to `max` bytes: printable ASCII (weighted `plain`) mixed with
    /// every kind of byte that ends a string's fast path.
    fn string_bytes(plain: u32, max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                plain => 0x20u8..0x7f,
                1 => Just(b'\\'),
                1 => Just(b'"'),
                1 => 0u8..0x20,
                1 => 0x80u8..=0xff,
            ],
            0..max,
        )
    }

    proptest! {
        /// Any string serde_json writes, the scanner reads back unchanged.
        #[test]
        fn strings_round_trip(v in "\\PC*|[\\x00-\\x1f\"\\\\/]{0,8}") {
            let json = serde_json::to_string(&v).unwrap();
            let mut sc = Scanner::new(json.as_bytes());
            let mut buf = Vec::new();
            prop_assert_eq!(sc.string(&mut buf).unwrap(), v.as_str());
            prop_assert!(sc.end().is_ok());
        }

        /// Any bytes between quotes: the scanner reads a string exactly
        /// when serde_json does (control characters, bad UTF-8, bad
        /// escapes), and reads the same string, short or long.
        #[test]
        fn string_bytes_agree_with_serde_json(body in string_bytes(4, 80)) {
            let mut doc = vec![b'"'];
            doc.extend_from_slice(&body);
            doc.push(b'"');
            let theirs = serde_json::from_slice::<String>(&doc).ok();
            let mut sc = Scanner::new(&doc);
            let mut buf = Vec::new();
            let ours = sc.bytes(&mut buf).ok().map(<[u8]>::to_vec);
            let ours = ours.filter(|_| sc.end().is_ok());
            prop_assert_eq!(ours, theirs.map(String::into_bytes), "{:?}", String::from_utf8_lossy(&doc));
        }

        /// The eight-bytes-at-a-time run finder stops exactly where a
        /// byte-at-a-time one does, wherever the stopping byte falls in a
        /// word.
        #[test]
        fn plain_run_matches_bytewise(s in string_bytes(16, 64)) {
            let bytewise =
                s.iter().take_while(|&&c| c != b'"' && c != b'\\' && (0x20..0x80).contains(&c)).count();
            prop_assert_eq!(plain_run(&s), bytewise);
        }

        /// Integers read exactly; floats read as Rust parses them.
        #[test]
        fn numbers_round_trip(i in any::<i64>(), f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let t = i.to_string();
            prop_assert_eq!(Scanner::new(t.as_bytes()).number().unwrap(), Num::Int(i));
            let t = serde_json::to_string(&f).unwrap();
            match Scanner::new(t.as_bytes()).number().unwrap() {
                Num::Float { value, .. } => prop_assert_eq!(value, f),
                Num::Int(n) => prop_assert_eq!(n as f64, f),
            }
        }

        /// The scanner accepts a document exactly when serde_json does
        /// (for documents without numbers beyond f64's range).
        #[test]
        fn accepts_what_serde_json_accepts(doc in "[\\[\\]{}\",:0-9a-z \\\\.eE+-]{0,40}") {
            let ours = {
                let mut sc = Scanner::new(doc.as_bytes());
                sc.skip(128, &mut Vec::new()).and_then(|()| sc.end()).is_ok()
            };
            let theirs = serde_json::from_str::<serde::de::IgnoredAny>(&doc).is_ok();
            prop_assert_eq!(ours, theirs, "document {:?}", doc);
        }
    }
}
