//! Thread ids: one rule, parsed once at the boundary, enforced by every backend.
//!
//! A valid id is any Unicode text of 1 to [`MAX_ID_LEN`] bytes in UTF-8 without control
//! characters (U+0000 to U+001F and U+007F to U+009F) and without `/`, `\`, `?`, `#` or `%`,
//! and is not `.` or `..`. So `user.42`, `café-1`, `ana@example.com`, `a b` and `会话 7` are
//! valid; `../etc`, `a/b`, `tab\there`, `50%`, the empty string and 129 bytes are not. The
//! excluded characters are the ones that change a URL's meaning even when a client forgets to
//! percent-encode them (`/ ? #`), that start an escape (`%`), that some servers and proxies
//! treat as a path separator (`\`), or that cannot be stored or logged safely (controls).
//!
//! Ids are compared byte by byte, with no Unicode normalisation: `café` written with `é`
//! (U+00E9) and with `e` plus U+0301 are two different ids. Listing orders by those bytes too,
//! in every store (PostgreSQL keeps ids with the `"C"` collation, which compares bytes).
//!
//! Valid ids may still hold characters that are special to file systems or NATS subjects;
//! backends never use the id raw there but its [`ThreadId::encoded`] form, which is injective
//! and uses only `[A-Za-z0-9_-]`, so no id can name another thread's file or subject. In URLs
//! an id is one percent-encoded path segment (its UTF-8 bytes).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted id, in bytes of UTF-8 (not characters); its encoded form (4/3 as long plus
/// a prefix) still fits a 255-byte file name.
pub const MAX_ID_LEN: usize = 128;

/// A valid thread id (see the module docs); ordered by its UTF-8 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ThreadId(String);

/// Why a string is not a thread id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// The empty string.
    #[error("must not be empty")]
    Empty,
    /// More than [`MAX_ID_LEN`] bytes (the count in bytes).
    #[error("must be at most {MAX_ID_LEN} bytes in UTF-8, got {0}")]
    TooLong(usize),
    /// A character the rule excludes.
    #[error("character {0:?} is not allowed (no control characters, no / \\ ? # %)")]
    BadChar(char),
    /// `.` or `..`.
    #[error("must not be `.` or `..`")]
    Dots,
}

/// Whether `c` may appear in an id (see the module docs).
pub fn allowed_char(c: char) -> bool {
    !c.is_control() && !matches!(c, '/' | '\\' | '?' | '#' | '%')
}

impl ThreadId {
    /// Checks `s` against the id rule.
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(InvalidId::TooLong(s.len()));
        }
        if let Some(c) = s.chars().find(|c| !allowed_char(*c)) {
            return Err(InvalidId::BadChar(c));
        }
        if s == "." || s == ".." {
            return Err(InvalidId::Dots);
        }
        Ok(ThreadId(s.to_owned()))
    }

    /// A fresh server-generated id (UUIDv7: time-ordered, so new threads list last).
    pub fn generate() -> Self {
        ThreadId(uuid::Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Injective encoding using only `[A-Za-z0-9_-]`: safe as a file name and a subject token.
    pub fn encoded(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.as_bytes())
    }

    /// Inverse of [`ThreadId::encoded`]; `None` for anything that is not a valid encoded id.
    pub fn decode(encoded: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        ThreadId::parse(std::str::from_utf8(&bytes).ok()?).ok()
    }
}

impl fmt::Display for ThreadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ThreadId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ThreadId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_per_the_rule() {
        for ok in [
            "user.42",
            "a*b",
            "x>y",
            "t-1_2:3@4~5",
            "café-1",
            "ana@example.com",
            "a b",
            " leading",
            "会话 7",
            "🚀",
            "...",
            "\u{a0}",
            "\u{200b}",
            &"a".repeat(MAX_ID_LEN),
            &"é".repeat(MAX_ID_LEN / 2),
        ] {
            assert!(ThreadId::parse(ok).is_ok(), "{ok:?} should be valid");
        }
        assert_eq!(ThreadId::parse(""), Err(InvalidId::Empty));
        assert_eq!(ThreadId::parse("tab\there"), Err(InvalidId::BadChar('\t')));
        assert_eq!(ThreadId::parse("nul\0"), Err(InvalidId::BadChar('\0')));
        assert_eq!(
            ThreadId::parse("del\u{7f}"),
            Err(InvalidId::BadChar('\u{7f}'))
        );
        assert_eq!(
            ThreadId::parse("c1\u{85}"),
            Err(InvalidId::BadChar('\u{85}'))
        );
        assert_eq!(ThreadId::parse("../etc"), Err(InvalidId::BadChar('/')));
        for c in ['/', '\\', '?', '#', '%'] {
            assert_eq!(
                ThreadId::parse(&format!("a{c}b")),
                Err(InvalidId::BadChar(c))
            );
        }
        assert_eq!(ThreadId::parse("."), Err(InvalidId::Dots));
        assert_eq!(ThreadId::parse(".."), Err(InvalidId::Dots));
        assert_eq!(
            ThreadId::parse(&"a".repeat(300)),
            Err(InvalidId::TooLong(300))
        );
        // The bound is in bytes: 65 two-byte characters are 130 bytes.
        assert_eq!(
            ThreadId::parse(&"é".repeat(MAX_ID_LEN / 2 + 1)),
            Err(InvalidId::TooLong(MAX_ID_LEN + 2))
        );
    }

    #[test]
    fn order_is_by_utf8_bytes() {
        let mut ids: Vec<ThreadId> = ["z", "é", "a", "\u{ffff}", "🚀", "Z", "ä"]
            .into_iter()
            .map(|s| ThreadId::parse(s).unwrap())
            .collect();
        ids.sort();
        let bytes: Vec<&[u8]> = ids.iter().map(|i| i.as_str().as_bytes()).collect();
        assert!(bytes.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    #[test]
    fn encoding_is_injective_and_safe() {
        let ids = [
            "a*b",
            "a.b",
            "a>b",
            "ab",
            "a_b",
            "A-b",
            "café",
            "cafe\u{301}",
            "🚀 x",
            &"~".repeat(MAX_ID_LEN),
            &"é".repeat(MAX_ID_LEN / 2),
        ];
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            let id = ThreadId::parse(id).unwrap();
            let enc = id.encoded();
            assert!(
                enc.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert!(enc.len() < 250);
            assert_eq!(ThreadId::decode(&enc), Some(id));
            assert!(seen.insert(enc));
        }
    }
}
