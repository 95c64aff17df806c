//! Lines that carry their own checksum, as the hub's append-only logs
//! write them (the lake's commit log, the keyring's key log): the line's
//! text, a tab, the CRC-32 of the text in eight hex digits, and a
//! newline. The checksum tells a line damaged on disk from a good one,
//! whether or not the damage left it valid JSON. JSON as these logs write
//! it holds no raw tab (inside a string it is escaped), so the last tab is
//! where the checksum starts.

/// Seal the line that starts at `start` in `buf` (its text written there,
/// without a newline): append the tab, the checksum and the newline.
pub fn seal(buf: &mut Vec<u8>, start: usize) {
    let crc = crc32fast::hash(&buf[start..]);
    buf.extend_from_slice(format!("\t{crc:08x}\n").as_bytes());
}

/// Why a line's checksum did not let it through [`unseal`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsealed {
    /// The text is not what the checksum was made from.
    #[error("its checksum does not match")]
    Mismatch,
    /// What follows the last tab is not eight hex digits.
    #[error("{0:?} after its last tab is not a checksum")]
    NotAChecksum(String),
}

/// The text of a sealed `line` (without its newline), once its checksum
/// is checked. A line without a tab was written without one (a shredded
/// key log line, or a log from before lines carried one) and is its own
/// text.
///
/// # Errors
/// [`Unsealed`] when the checksum is not one, or does not match.
pub fn unseal(line: &[u8]) -> Result<&[u8], Unsealed> {
    let Some(tab) = line.iter().rposition(|&b| b == b'\t') else { return Ok(line) };
    let (text, sum) = (&line[..tab], &line[tab + 1..]);
    if !is_checksum(sum) {
        return Err(Unsealed::NotAChecksum(String::from_utf8_lossy(sum).into_owned()));
    }
    let want = std::str::from_utf8(sum).ok().and_then(|s| u32::from_str_radix(s, 16).ok());
    match want {
        Some(want) if crc32fast::hash(text) == want => Ok(text),
        _ => Err(Unsealed::Mismatch),
    }
}

/// Whether `line` (without its newline) ends as a sealed line does: a
/// tab and eight hex digits.
#[must_use]
pub fn ends_sealed(line: &[u8]) -> bool {
    line.len().checked_sub(9).is_some_and(|at| line[at] == b'\t' && is_checksum(&line[at + 1..]))
}

fn is_checksum(s: &[u8]) -> bool {
    s.len() == 8 && s.iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed line reads back; one byte changed anywhere in it is
    /// refused, except the tab, whose loss leaves text with the checksum
    /// glued on (which the logs' JSON parse refuses); a line without a tab
    /// is its own text.
    #[test]
    fn a_sealed_line_reads_back_and_any_damage_is_refused() {
        let mut buf = b"{\"a\":1}".to_vec();
        seal(&mut buf, 0);
        assert_eq!(buf.len(), 7 + 10);
        let line = &buf[..buf.len() - 1];
        assert!(ends_sealed(line));
        assert_eq!(unseal(line), Ok(&b"{\"a\":1}"[..]));
        for at in 0..line.len() {
            let mut bad = line.to_vec();
            bad[at] ^= 0x01;
            match unseal(&bad) {
                Ok(text) => assert_eq!((at, text), (7, &bad[..]), "damage at {at}"),
                Err(_) => assert_ne!(at, 7),
            }
        }
        assert_eq!(unseal(b"{}"), Ok(&b"{}"[..]));
        assert_eq!(unseal(b"{}\t+1234567"), Err(Unsealed::NotAChecksum("+1234567".into())));
        assert!(!ends_sealed(b"{}\t1234567"));
    }
}
