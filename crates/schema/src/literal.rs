//! Literals read from JSON strings and numbers by exact rules: decimals
//! (no silent rounding), `%Y-%m-%d` dates, and UUIDs.

/// Parse `-?digits(.digits)?([eE][+-]?digits)?` exactly into an unscaled
/// value at `scale`, or `None` when that would need rounding.
#[inline]
pub(crate) fn parse_decimal(text: &str, scale: u8) -> Option<i128> {
    plain_decimal(text.as_bytes(), scale).or_else(|| general_decimal(text, scale))
}

fn general_decimal(text: &str, scale: u8) -> Option<i128> {
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (neg, m) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let (int, frac) = m.split_once('.').unwrap_or((m, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    if m.contains('.') && frac.is_empty() {
        return None;
    }
    let mut value: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    // value * 10^(exp - frac.len()) expressed at `scale`.
    let shift = i64::from(scale) + i64::from(exp) - i64::try_from(frac.len()).ok()?;
    if shift >= 0 {
        value = value.checked_mul(10i128.checked_pow(u32::try_from(shift).ok()?)?)?;
    } else {
        let div = 10i128.checked_pow(u32::try_from(-shift).ok()?)?;
        if value % div != 0 {
            return None;
        }
        value /= div;
    }
    Some(if neg { -value } else { value })
}

/// The common case of [`parse_decimal`] in one pass: `-?digits(.digits)?`
/// in at most 18 characters, with no more fraction digits than `scale`.
/// `None` sends anything else to the general parser.
#[inline]
pub(crate) fn plain_decimal(b: &[u8], scale: u8) -> Option<i128> {
    let (neg, b) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    // Eighteen characters hold at most eighteen digits: no i64 overflow.
    if b.is_empty() || b.len() > 18 {
        return None;
    }
    let (mut value, mut frac, mut point, mut int_digits) = (0i64, 0u32, false, 0u32);
    for &c in b {
        match c {
            b'0'..=b'9' => {
                value = value * 10 + i64::from(c - b'0');
                if point {
                    frac += 1;
                } else {
                    int_digits += 1;
                }
            }
            b'.' if !point => point = true,
            _ => return None,
        }
    }
    if int_digits == 0 || (point && frac == 0) || frac > u32::from(scale) {
        return None;
    }
    let value = i128::from(value).checked_mul(10i128.checked_pow(u32::from(scale) - frac)?)?;
    Some(if neg { -value } else { value })
}

/// Whether `v` has at most `precision` digits: one multiply chain, not a
/// 128-bit division per digit.
#[inline]
pub(crate) fn fits_precision(v: i128, precision: u8) -> bool {
    // Past 10^38 nothing an i128 holds is too long.
    10u128.checked_pow(u32::from(precision)).is_none_or(|limit| v.unsigned_abs() < limit)
}

/// Whether `b` is a UUID in its 8-4-4-4-12 hex form.
#[inline]
pub(crate) fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Days since 1970-01-01 of a `%Y-%m-%d` date. The common form (four-digit
/// year, two-digit month and day) is read directly; anything else is left
/// to chrono's parser, which gives the same answer for the common form.
#[inline]
pub(crate) fn parse_date(b: &[u8]) -> Option<i32> {
    let digits = |r: std::ops::Range<usize>| {
        b[r].iter().try_fold(0u32, |n, &c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    let common = (b.len() == 10 && b[4] == b'-' && b[7] == b'-')
        .then(|| {
            let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
            chrono::NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d)
        })
        .flatten();
    let d = match common {
        Some(d) => d,
        None => chrono::NaiveDate::parse_from_str(std::str::from_utf8(b).ok()?, "%Y-%m-%d").ok()?,
    };
    i32::try_from((d - chrono::NaiveDate::default()).num_days()).ok()
}

#[cfg(test)]
mod tests {
    use super::{fits_precision, general_decimal, parse_date, parse_decimal, plain_decimal};
    use proptest::prelude::*;

    proptest! {
        /// Dates read directly agree with chrono's `%Y-%m-%d` on
        /// well-formed, out-of-range and malformed input alike.
        #[test]
        fn dates_agree_with_chrono(
            y in 0u32..10_000, m in 0u32..14, d in 0u32..33,
            junk in proptest::sample::select(vec!["", " ", "x", "+", "-"]),
            at in 0usize..11,
        ) {
            let mut s = format!("{y:04}-{m:02}-{d:02}");
            s.insert_str(at.min(s.len()), junk);
            let chrono = chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d")
                .ok()
                .map(|d| i32::try_from((d - chrono::NaiveDate::default()).num_days()).unwrap());
            prop_assert_eq!(parse_date(s.as_bytes()), chrono, "{}", s);
        }
    }

    #[test]
    fn precision_counts_digits() {
        assert!(fits_precision(0, 1));
        assert!(fits_precision(9, 1));
        assert!(!fits_precision(10, 1));
        assert!(fits_precision(-99_999, 5));
        assert!(!fits_precision(-100_000, 5));
        assert!(fits_precision(i128::MAX, 39));
        assert!(!fits_precision(i128::MIN, 38));
        assert!(fits_precision(10i128.pow(38) - 1, 38));
    }

    #[test]
    fn decimals_parse_exactly() {
        assert_eq!(parse_decimal("12.34", 2), Some(1234));
        assert_eq!(parse_decimal("-0.5", 2), Some(-50));
        assert_eq!(parse_decimal("1e2", 0), Some(100));
        assert_eq!(parse_decimal("1.5e-1", 2), Some(15));
        assert_eq!(parse_decimal("1.234", 2), None, "no silent rounding");
        assert_eq!(parse_decimal("1.", 2), None);
        assert_eq!(parse_decimal("abc", 2), None);
        assert_eq!(parse_decimal("", 2), None);
        assert_eq!(parse_decimal("-", 2), None);
        assert_eq!(parse_decimal(".5", 2), None);
        assert_eq!(parse_decimal("1.2.3", 2), None);
        assert_eq!(parse_decimal("007", 0), Some(7));
        assert_eq!(parse_decimal("999999999999999999", 0), Some(999_999_999_999_999_999));
        assert_eq!(parse_decimal("9999999999999999999", 0), Some(9_999_999_999_999_999_999));
        assert_eq!(parse_decimal("-12.3", 3), Some(-12_300));
    }

    proptest::proptest! {
        /// The one-pass reading agrees with the general one wherever it
        /// answers.
        #[test]
        fn plain_decimals_agree(int in "-?[0-9]{1,12}", frac in proptest::option::of("[0-9]{0,8}"), scale in 0u8..12) {
            let text = match &frac { Some(f) => format!("{int}.{f}"), None => int.clone() };
            if let Some(fast) = plain_decimal(text.as_bytes(), scale) {
                proptest::prop_assert_eq!(Some(fast), general_decimal(&text, scale));
            }
            proptest::prop_assert_eq!(parse_decimal(&text, scale), general_decimal(&text, scale));
        }
    }
}
