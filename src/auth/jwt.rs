//! JWT verification with the [`jsonwebtoken`] crate (its RustCrypto backend: pure Rust, no C
//! toolchain, and verification only ever uses public keys or the shared secret).
//!
//! Keys: `--jwt-secret` (HS256/HS384/HS512; at least 32 bytes, RFC 7518 §3.2) and/or
//! `--jwt-public-key FILE`, which holds either one PEM public key (RSA: RS256/384/512 and
//! PS256/384/512; EC: ES256/ES384; Ed25519: EdDSA) or a JWKS (`{"keys": [...]}`, or a single
//! JWK) as an identity provider publishes it. With a JWKS, a token's `kid` picks the key; keys
//! marked `"use": "enc"` are skipped, and a key's `alg` (when present) is the only algorithm it
//! verifies. A token's algorithm must belong to the key that verifies it, so an RSA public key
//! can never be used as an HMAC secret (the classic algorithm confusion).
//!
//! Claims: `exp` is required and enforced, `nbf` is enforced when present, both with
//! `--jwt-leeway` of clock skew; `aud` and `iss` are required and checked when
//! `--jwt-audience` / `--jwt-issuer` are given. The claim named by `--jwt-resource-claim`
//! (default `sub`) must be a non-empty string (or a number) and is the caller's resource_id.

use super::{AuthConfig, AuthError, Caller, MAX_RESOURCE_LEN};
use anyhow::{Context, bail};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Shortest accepted HMAC secret: as long as the SHA-256 output (RFC 7518 §3.2).
pub const MIN_SECRET_LEN: usize = 32;

/// One verification key.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies JWTs against the configured keys and claims.
pub struct JwtVerifier {
    keys: Vec<Key>,
    audience: Vec<String>,
    issuer: Vec<String>,
    resource_claim: String,
    leeway: u64,
}

/// Whether a credential has a JWT's shape (three base64url parts), so a static token that is
/// not known is answered "unknown token" rather than "malformed JWT".
pub fn looks_like_jwt(s: &str) -> bool {
    s.split('.').count() == 3
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

impl JwtVerifier {
    /// The verifier for the configuration, or `None` when no JWT key is configured.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Option<Self>> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            let secret = secret.0.as_bytes();
            if secret.len() < MIN_SECRET_LEN {
                bail!("--jwt-secret must be at least {MIN_SECRET_LEN} bytes (RFC 7518 §3.2)");
            }
            keys.push(Key {
                kid: None,
                key: DecodingKey::from_secret(secret)?,
                algorithms: AlgorithmFamily::Hmac.algorithms().to_vec(),
            });
        }
        if let Some(path) = &config.jwt_public_key {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --jwt-public-key file {}", path.display()))?;
            let loaded = parse_public_keys(&text)
                .with_context(|| format!("--jwt-public-key file {}", path.display()))?;
            keys.extend(loaded);
        }
        if keys.is_empty() {
            return Ok(None);
        }
        if config.jwt_resource_claim.is_empty() {
            bail!("--jwt-resource-claim must name a claim");
        }
        if config.jwt_audience.is_empty() {
            tracing::warn!(
                "JWTs are accepted for any audience: set --jwt-audience so a token your \
                 identity provider issued for another application is refused"
            );
        }
        Ok(Some(JwtVerifier {
            keys,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            resource_claim: config.jwt_resource_claim.clone(),
            leeway: config.jwt_leeway.as_secs(),
        }))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&self.issuer);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// Verifies a token and returns its (scoped) caller.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("malformed JWT"))?;
        let by_alg = self
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&header.alg));
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) if self.keys.iter().any(|k| k.kid.as_ref() == Some(kid)) => {
                by_alg.filter(|k| k.kid.as_ref() == Some(kid)).collect()
            }
            _ => by_alg.collect(),
        };
        if candidates.is_empty() {
            return Err(AuthError::Invalid(
                "no configured key accepts its algorithm",
            ));
        }
        let validation = self.validation(header.alg);
        let mut last = AuthError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return self.caller(&data.claims),
                Err(e) => {
                    last = map_error(e.kind());
                    if last != AuthError::BadSignature {
                        // The signature verified (claims are checked after it): this is the
                        // key, and the claims are what is wrong.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn caller(&self, claims: &Map<String, Value>) -> Result<Caller, AuthError> {
        let resource = match claims.get(&self.resource_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(AuthError::MissingClaim(self.resource_claim.clone())),
        };
        if resource.len() > MAX_RESOURCE_LEN {
            return Err(AuthError::Invalid("the resource claim is too long"));
        }
        Ok(Caller::scoped(&resource))
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            AuthError::Invalid("algorithm not accepted")
        }
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidEddsaKey => {
            AuthError::BadSignature
        }
        _ => AuthError::Invalid("malformed JWT"),
    }
}

/// The keys of a `--jwt-public-key` file: one PEM public key, a JWKS, or a single JWK.
fn parse_public_keys(text: &str) -> anyhow::Result<Vec<Key>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let value: Value = serde_json::from_str(trimmed).context("not valid JSON")?;
        let set: JwkSet = if value.get("keys").is_some() {
            serde_json::from_value(value).context("not a JWKS")?
        } else {
            JwkSet {
                keys: vec![serde_json::from_value(value).context("not a JWK")?],
            }
        };
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| anyhow::anyhow!("key {i} of the JWKS: {e}"))?;
            if key.family() == AlgorithmFamily::Hmac {
                bail!(
                    "key {i} of the JWKS is a symmetric key: put shared secrets in \
                     --jwt-secret, not in a key file"
                );
            }
            let algorithms = match jwk.common.key_algorithm {
                Some(alg) => {
                    // The JWK's `alg` name, read as a signature algorithm.
                    let name = serde_json::to_value(alg)?;
                    let alg = name
                        .as_str()
                        .and_then(|n| n.parse::<Algorithm>().ok())
                        .filter(|a| key.family().algorithms().contains(a))
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "key {i} of the JWKS: alg {name} is not a signature algorithm \
                                 for this key"
                            )
                        })?;
                    vec![alg]
                }
                None => key.family().algorithms().to_vec(),
            };
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms,
            });
        }
        if keys.is_empty() {
            bail!("the JWKS holds no signature key");
        }
        return Ok(keys);
    }
    if !trimmed.starts_with("-----BEGIN") {
        bail!("expected a PEM public key (-----BEGIN PUBLIC KEY-----) or a JWKS (JSON)");
    }
    if trimmed.contains("PRIVATE KEY") {
        bail!("this is a private key: give the gateway the public key only");
    }
    let bytes = trimmed.as_bytes();
    let key = DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|e| anyhow::anyhow!("not an RSA, EC or Ed25519 public key: {e}"))?;
    Ok(vec![Key {
        kid: None,
        algorithms: key.family().algorithms().to_vec(),
        key,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.sig-_"));
        assert!(!looks_like_jwt("admin-token-0123456789"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c d"));
    }

    #[test]
    fn bad_key_files_are_explained() {
        for (text, says) in [
            ("hello", "expected a PEM"),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "private key",
            ),
            (
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                "not an RSA",
            ),
            (r#"{"keys": []}"#, "no signature key"),
            (
                r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
                "symmetric",
            ),
            ("{not json", "not valid JSON"),
        ] {
            let err = format!("{:#}", parse_public_keys(text).err().expect(text));
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
