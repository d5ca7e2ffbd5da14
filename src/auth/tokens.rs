//! Static tokens (`--auth-tokens FILE`): one per line, `<token> admin` or
//! `<token> resource:<resource_id>`; blank lines and lines starting with `#` are ignored.
//!
//! A malformed file stops start-up with an error naming the file and the line (never the
//! token). Tokens must be at least [`MIN_TOKEN_LEN`] visible ASCII characters, so a typo or a
//! placeholder cannot become a credential; the same token twice is an error.
//!
//! Tokens are kept only as SHA-256 digests and a presented token is compared against every
//! one of them in constant time ([`subtle`]), without stopping at a match: how long a lookup
//! takes says nothing about how much of a token was right (hashing first also hides the
//! length). With a few hundred tokens a lookup costs a few microseconds.

use super::{Caller, MAX_RESOURCE_LEN, Scope};
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::path::Path;
use subtle::ConstantTimeEq;

/// Shortest accepted token.
pub const MIN_TOKEN_LEN: usize = 16;

struct Entry {
    digest: [u8; 32],
    caller: Caller,
}

/// The tokens of the file, as digests.
pub struct TokenTable {
    entries: Vec<Entry>,
}

impl TokenTable {
    /// Reads and parses the file; warns when others may read it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --auth-tokens file {}", path.display()))?;
        warn_if_shared(path);
        let table = Self::parse(&text)
            .map_err(|e| anyhow::anyhow!("--auth-tokens file {}: {e}", path.display()))?;
        tracing::info!(
            file = %path.display(),
            tokens = table.entries.len(),
            "static tokens loaded"
        );
        Ok(table)
    }

    /// Parses the file's text (see the module docs).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (token, scope) = match line.split_once(char::is_whitespace) {
                Some((t, s)) => (t, s.trim()),
                None => bail!(
                    "line {n}: expected `<token> admin` or `<token> resource:<resource_id>`, \
                     got a single word"
                ),
            };
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "line {n}: the token must be at least {MIN_TOKEN_LEN} visible ASCII \
                     characters"
                );
            }
            let caller = if scope == "admin" {
                Caller {
                    scope: Scope::Admin,
                    key: Some(format!("admin token (line {n})").into()),
                }
            } else if let Some(resource) = scope.strip_prefix("resource:") {
                if resource.is_empty() {
                    bail!("line {n}: `resource:` needs a resource_id after it");
                }
                if resource.len() > MAX_RESOURCE_LEN {
                    bail!("line {n}: the resource_id is longer than {MAX_RESOURCE_LEN} bytes");
                }
                Caller::scoped(resource)
            } else {
                bail!(
                    "line {n}: the scope must be `admin` or `resource:<resource_id>`, got {:?}",
                    scope.chars().take(40).collect::<String>()
                );
            };
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if let Some(first) = entries.iter().position(|e| e.digest == digest) {
                bail!(
                    "line {n}: the same token as line {} (every token must be distinct)",
                    lines_of[first]
                );
            }
            entries.push(Entry { digest, caller });
            lines_of.push(n);
        }
        if entries.is_empty() {
            bail!("no tokens (every line is blank or a comment)");
        }
        Ok(TokenTable { entries })
    }

    /// The caller a token belongs to, compared in constant time against every token.
    pub fn find(&self, token: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(&entry.caller);
            }
        }
        found.cloned()
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no tokens (never true for a loaded table).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Warns when the file is readable or writable by users other than its owner.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the tokens file is accessible to other users; `chmod 600` it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_admin_and_scoped_tokens() {
        let t = TokenTable::parse(
            "# comment\n\n  admin-token-0123456789 admin\nalice-token-0123456789\tresource:user 1\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.find("admin-token-0123456789").unwrap().scope,
            Scope::Admin
        );
        let alice = t.find("alice-token-0123456789").unwrap();
        assert_eq!(alice.scope, Scope::Resource("user 1".into()));
        assert_eq!(alice.key.as_deref(), Some("resource user 1"));
        assert!(t.find("alice-token-012345678").is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn malformed_files_name_the_line_and_never_the_token() {
        for (text, line) in [
            ("secret-secret-secret-1\n", "line 1"),
            ("# ok\nshort admin\n", "line 2"),
            ("x\n\nsecret-secret-secret-1 root\n", "line 1"),
            (
                "secret-secret-secret-1 admin\nsecret-secret-secret-2 resource:\n",
                "line 2",
            ),
            (
                "secret-secret-secret-1 admin\n\nsecret-secret-secret-1 resource:a\n",
                "line 3",
            ),
            ("secret-secret-secret-1 roots\n", "line 1"),
        ] {
            let err = TokenTable::parse(text).err().expect(text).to_string();
            assert!(err.starts_with(line), "{text:?}: {err}");
            assert!(!err.contains("secret-secret"), "{err} shows a token");
        }
        assert!(TokenTable::parse("# nothing\n").is_err());
        let long = format!(
            "secret-secret-secret-1 resource:{}",
            "r".repeat(MAX_RESOURCE_LEN + 1)
        );
        assert!(TokenTable::parse(&long).is_err());
    }
}
