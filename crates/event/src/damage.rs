//! Damage to JSON text, for the tests that hold each of the project's
//! JSON readers (the validator, the envelope reader, `send`'s input
//! reader) to serde_json's reading of the same damaged text. Not used
//! outside tests.

/// What damage puts in: bytes of JSON's grammar, bytes that are not
/// UTF-8 or not allowed raw in a string, a byte order mark, and short
/// runs (escapes, surrogates, an exponent past f64's, literals).
pub const PIECES: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"0",
    b"1",
    b"9",
    b"e",
    b"E",
    b".",
    b"-",
    b"+",
    b" ",
    b"\t",
    b"\n",
    b"\r",
    b"\r\n",
    b"\x00",
    b"\x0b",
    b"\x1f",
    b"\x7f",
    b"a",
    b"n",
    b"u",
    b"/",
    b"\x80",
    b"\xc3",
    b"\xa9",
    b"\xff",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    b"\\u",
    b"\\ud800",
    b"\\udc00",
    b"\\u00e9",
    b"\\uD83D\\uDE00",
    b"1e400",
    b"-0",
    b"0.0e-0",
    b"null",
    b"true",
    b"false",
    b"{}",
    b"[]",
];

/// One change to a document: at byte `at` (taken modulo the document's
/// length plus one), with `piece`, by `how`: 0 replaces the byte there,
/// 1 inserts before it, anything else takes out up to `piece`'s length
/// in bytes (at least one).
pub fn apply(doc: &mut Vec<u8>, at: usize, how: u8, piece: &[u8]) {
    let at = at % (doc.len() + 1);
    match how {
        0 => {
            let end = (at + 1).min(doc.len());
            doc.splice(at..end, piece.iter().copied());
        }
        1 => {
            doc.splice(at..at, piece.iter().copied());
        }
        _ => {
            let end = (at + piece.len().clamp(1, 3)).min(doc.len());
            doc.drain(at..end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::apply;

    #[test]
    fn replaces_inserts_and_takes_out() {
        let doc = b"{\"a\":1}".to_vec();
        let after = |at, how, piece: &[u8]| {
            let mut d = doc.clone();
            apply(&mut d, at, how, piece);
            String::from_utf8_lossy(&d).into_owned()
        };
        assert_eq!(after(5, 0, b"22"), "{\"a\":22}");
        assert_eq!(after(0, 1, b" "), " {\"a\":1}");
        assert_eq!(after(6, 2, b"xx"), "{\"a\":1");
        assert_eq!(after(7, 1, b"x"), "{\"a\":1}x", "the end is a place too");
        assert_eq!(after(8 + 4, 2, b"x"), "{\"a\"1}", "modulo the length plus one");
    }
}
