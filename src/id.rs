//! Thread ids: one rule, parsed once at the boundary, enforced by every backend.
//!
//! A valid id is 1 to [`MAX_ID_LEN`] characters, each a visible ASCII character other than
//! `/`, `\`, `?`, `#` and `%`, and not `.` or `..`. So `user.42`, `a*b` and `x>y` are valid;
//! `has space`, `../etc`, the empty string and 300 characters are not. Valid ids may still
//! hold characters that are special to file systems or NATS subjects; backends never use the
//! id raw there but its [`ThreadId::encoded`] form, which is injective and uses only
//! `[A-Za-z0-9_-]`, so no id can name another thread's file or subject.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted id, in bytes; its encoded form (4/3 as long plus a prefix) still fits a
/// 255-byte file name.
pub const MAX_ID_LEN: usize = 128;

/// A valid thread id (see the module docs for the rule).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ThreadId(String);

/// Why a string is not a thread id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// The empty string.
    #[error("must not be empty")]
    Empty,
    /// Longer than [`MAX_ID_LEN`] bytes.
    #[error("must be at most {MAX_ID_LEN} characters, got {0}")]
    TooLong(usize),
    /// A character the rule refuses.
    #[error("character {0:?} is not allowed (visible ASCII except / \\ ? # %)")]
    BadChar(char),
    /// `.` or `..`.
    #[error("must not be `.` or `..`")]
    Dots,
}

impl ThreadId {
    /// Checks the rule and wraps the id.
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(InvalidId::TooLong(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '/' | '\\' | '?' | '#' | '%'))
        {
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
            &"a".repeat(MAX_ID_LEN),
        ] {
            assert!(ThreadId::parse(ok).is_ok(), "{ok} should be valid");
        }
        assert_eq!(ThreadId::parse(""), Err(InvalidId::Empty));
        assert_eq!(ThreadId::parse("has space"), Err(InvalidId::BadChar(' ')));
        assert_eq!(ThreadId::parse("../etc"), Err(InvalidId::BadChar('/')));
        assert_eq!(ThreadId::parse(".."), Err(InvalidId::Dots));
        assert_eq!(
            ThreadId::parse(&"a".repeat(300)),
            Err(InvalidId::TooLong(300))
        );
        assert_eq!(ThreadId::parse("é"), Err(InvalidId::BadChar('é')));
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
            &"~".repeat(MAX_ID_LEN),
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
