//! The viewer page and the browser module: `GET /` (static/index.html) and
//! `GET /static/{path}` (everything under static/), with a strict Content-Security-Policy.
//!
//! Why embedded: the gateway must work offline and behind a firewall with nothing but its
//! binary (no CDN, no build step, no files to ship beside it), so static/ is compiled in with
//! `rust-embed` (chosen over `include_dir` because it computes each file's SHA-256 at compile
//! time, which gives strong `ETag`s for free, and offers `debug-embed` so debug and release
//! builds behave the same). `--static-dir` serves the same paths from a directory instead, so
//! the page can be edited and reloaded without rebuilding; both sources answer with the same
//! headers.
//!
//! Every answer carries the CSP below: scripts and styles only from this origin and only as
//! files (no inline script or style, no `eval`), requests only to this origin, no framing. The
//! files are small and change with the binary, so they are revalidated (`no-cache` + `ETag`)
//! rather than cached blindly.

use super::AppState;
use super::error::ApiError;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::path::PathBuf;

/// The policy sent with every static answer (and so with the page at `/`).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

/// Longest accepted asset path: far above any real file name, and it bounds the checks.
const MAX_PATH_LEN: usize = 200;

#[derive(RustEmbed)]
#[folder = "static/"]
struct Embedded;

/// Where the static files come from.
#[derive(Debug, Clone, Default)]
pub struct Assets {
    /// `None`: the files compiled into the binary; `Some(dir)`: read from `dir` per request.
    dir: Option<PathBuf>,
}

/// One file to send.
struct Asset {
    bytes: Cow<'static, [u8]>,
    /// Hex SHA-256 of the bytes.
    hash: String,
}

impl Assets {
    /// The embedded files, or those in `dir` when given (`--static-dir`).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Assets { dir }
    }

    async fn load(&self, path: &str) -> Result<Option<Asset>, ApiError> {
        let Some(dir) = &self.dir else {
            return Ok(Embedded::get(path).map(|f| Asset {
                hash: hex::encode(f.metadata.sha256_hash()),
                bytes: f.data,
            }));
        };
        match tokio::fs::read(dir.join(path)).await {
            Ok(bytes) => Ok(Some(Asset {
                hash: hex::encode(Sha256::digest(&bytes)),
                bytes: Cow::Owned(bytes),
            })),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) => Ok(None),
            // A directory, or a file we may not read: not something we serve.
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => Ok(None),
            Err(e) => Err(ApiError::Internal(format!(
                "reading static file {path}: {e}"
            ))),
        }
    }
}

/// A path we are willing to look up: segments of `[A-Za-z0-9._-]` that do not start with a
/// dot, so nothing can climb out of the directory or reach hidden files.
fn valid(path: &str) -> bool {
    path.len() <= MAX_PATH_LEN
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// `GET /`: the viewer page.
pub async fn index(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    serve(&app.assets, "index.html", &headers).await
}

/// `GET /static/{path}`: a file under static/.
pub async fn file(
    State(app): State<AppState>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !valid(&path) {
        return Err(ApiError::NotFound("file"));
    }
    serve(&app.assets, &path, &headers).await
}

async fn serve(assets: &Assets, path: &str, req: &HeaderMap) -> Result<Response, ApiError> {
    let asset = assets.load(path).await?.ok_or(ApiError::NotFound("file"))?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", &asset.hash[..32]))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut res = asset.bytes.into_owned().into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(mime.as_ref()).map_err(|e| ApiError::Internal(e.to_string()))?,
        );
        res
    };
    let h = res.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_looked_up() {
        for ok in ["index.html", "threadgate.js", "img/logo.svg", "a-b_c.1.css"] {
            assert!(valid(ok), "{ok}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/../b",
            ".hidden",
            "a//b",
            "/abs",
            "a\\b",
            "a b",
            "%2e%2e",
            "a/.git/config",
        ] {
            assert!(!valid(bad), "{bad}");
        }
        assert!(!valid(&"a".repeat(MAX_PATH_LEN + 1)));
    }

    #[test]
    fn the_page_and_the_module_are_embedded() {
        for f in ["index.html", "threadgate.js", "viewer.js", "viewer.css"] {
            assert!(Embedded::get(f).is_some(), "{f} is embedded");
        }
    }
}
