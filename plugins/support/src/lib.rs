//! Helpers shared by the Rust destination plugins. No WIT types here: the
//! plugins convert at their edges, so this crate is plain, natively tested
//! Rust.

use sha2::{Digest, Sha256};

/// What an HTTP status means for a delivery, by the contract's retry rules:
/// 2xx delivered; 408, 429 and 5xx worth retrying; any other status final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    Retryable,
    Permanent,
}

/// Classify an HTTP status by the contract's retry rules.
pub fn classify_status(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Success,
        408 | 429 | 500..=599 => StatusClass::Retryable,
        _ => StatusClass::Permanent,
    }
}

/// Milliseconds to wait according to a `Retry-After` header given in
/// seconds (the HTTP-date form is not used by Meta or Brevo; it is ignored).
pub fn retry_after_ms<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<u64> {
    header_seconds(headers, "retry-after")
}

/// The value of a header holding a whole number of seconds, in milliseconds.
pub fn header_seconds<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>, name: &str) -> Option<u64> {
    headers
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000))
}

/// Lower-case hex SHA-256 of `value`.
pub fn sha256_hex(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// Shorten a downstream body for an error message, on a char boundary.
pub fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_retry_rules() {
        assert_eq!(classify_status(200), StatusClass::Success);
        assert_eq!(classify_status(201), StatusClass::Success);
        assert_eq!(classify_status(408), StatusClass::Retryable);
        assert_eq!(classify_status(429), StatusClass::Retryable);
        assert_eq!(classify_status(503), StatusClass::Retryable);
        assert_eq!(classify_status(400), StatusClass::Permanent);
        assert_eq!(classify_status(401), StatusClass::Permanent);
        assert_eq!(classify_status(404), StatusClass::Permanent);
        assert_eq!(classify_status(302), StatusClass::Permanent);
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(retry_after_ms([("Retry-After", "7")]), Some(7000));
        assert_eq!(retry_after_ms([("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]), None);
        assert_eq!(retry_after_ms([("x-other", "7")]), None);
    }

    #[test]
    fn sha256_matches_known_value() {
        assert_eq!(
            sha256_hex("john.doe@example.com"),
            "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"
        );
    }

    #[test]
    fn excerpt_cuts_long_bodies_safely() {
        let long = "é".repeat(400);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), 301);
        assert!(e.ends_with('…'));
    }
}
