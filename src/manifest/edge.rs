//! Edge tokens: an HMAC-SHA256 token that a CDN checks at the edge, in the
//! `field=value~field=value` form edge token schemes use.
//!
//! The URL is `<base_url><path>?token=<token>`, the token percent-encoded, and
//!
//! ```text
//! token   = "exp=" EXP "~acl=" ACL "~sid=" SID "~hmac=" HMAC
//! EXP     = the last second it is good for, Unix seconds
//! ACL     = the manifest path's directory, with a trailing "*": "/titles/42/*"
//! SID     = the session id it was issued to (for the edge's logs)
//! HMAC    = lowercase hex of HMAC-SHA256(secret, "exp=" EXP "~acl=" ACL "~sid=" SID)
//! ```
//!
//! An edge serves a request for path P only if the token's HMAC is that of the text
//! before "~hmac=" under the shared secret (compared in constant time), the current
//! time is at most EXP, and P starts with ACL without its "*". So the token covers the
//! manifest and every segment beside or below it, and nothing else. The secret is the
//! bytes of a hex string of at least 32 bytes.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{Grant, SignError, Signer};

/// The shortest secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 32;

/// An `[origin.edge]` table of the origins file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeEntry {
    /// The CDN's URL, scheme and host: `https://cdn.example.com`.
    pub base_url: String,
    /// The environment variable that holds the shared secret, hex.
    pub secret_env: String,
}

impl EdgeEntry {
    /// The signer, or what is wrong with the entry.
    pub fn build(self, secret: &dyn Fn(&str) -> Option<String>) -> Result<EdgeTokenSigner, String> {
        let base_url = self.base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
            return Err(format!(
                "edge.base_url must be an http(s) URL, not {base_url:?}"
            ));
        }
        let text = secret(&self.secret_env).ok_or_else(|| {
            format!(
                "edge.secret_env names {}, which is not set",
                self.secret_env
            )
        })?;
        let key = decode_hex(text.trim())
            .filter(|key| key.len() >= MIN_SECRET_BYTES)
            .ok_or_else(|| {
                format!(
                    "{} must hold at least {MIN_SECRET_BYTES} bytes as hex",
                    self.secret_env
                )
            })?;
        Ok(EdgeTokenSigner::new(base_url, key))
    }
}

/// Signs edge tokens with one shared secret.
pub struct EdgeTokenSigner {
    base_url: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for EdgeTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("EdgeTokenSigner")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl EdgeTokenSigner {
    pub fn new(base_url: String, key: Vec<u8>) -> Self {
        Self { base_url, key }
    }

    /// The token of `grant` (the format in the module docs).
    pub fn token(&self, grant: &Grant<'_>) -> Result<String, SignError> {
        let expires = grant
            .now
            .checked_add(grant.ttl)
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .ok_or_else(|| SignError::Signing("expiry out of range".into()))?
            .as_secs();
        let directory = &grant.path[..grant.path.rfind('/').map_or(0, |i| i + 1)];
        let signed = format!(
            "exp={expires}~acl={directory}*~sid={}",
            grant.session.session
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key)
            .map_err(|e| SignError::Signing(e.to_string()))?;
        mac.update(signed.as_bytes());
        let digest = mac.finalize().into_bytes();
        Ok(format!("{signed}~hmac={}", encode_hex(&digest)))
    }
}

impl Signer for EdgeTokenSigner {
    fn sign(&self, grant: &Grant<'_>) -> Result<String, SignError> {
        let token = self.token(grant)?;
        Ok(format!(
            "{}{}?token={}",
            self.base_url,
            grant.path,
            percent_encode(&token)
        ))
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Every byte but the unreserved ones (RFC 3986) as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::ids::{SessionId, SessionName, UserId};

    #[test]
    fn the_token_covers_the_manifest_directory_until_it_expires() {
        let signer = EdgeTokenSigner::new("https://cdn.example.com".into(), vec![7; 32]);
        let session = SessionName {
            user: UserId::parse("user", "u1").unwrap(),
            session: SessionId::parse("session", "0e6f4a52-8a36-4d0b-9f9b-0d4d3d6b1e11").unwrap(),
        };
        let grant = Grant {
            session: &session,
            path: "/titles/42/master.m3u8",
            now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            ttl: Duration::from_secs(300),
        };
        let token = signer.token(&grant).unwrap();
        let (signed, hmac) = token.split_once("~hmac=").unwrap();
        assert_eq!(
            signed,
            "exp=1800000300~acl=/titles/42/*~sid=0e6f4a52-8a36-4d0b-9f9b-0d4d3d6b1e11"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&[7; 32]).unwrap();
        mac.update(signed.as_bytes());
        mac.verify_slice(&decode_hex(hmac).unwrap()).unwrap();
        let url = signer.sign(&grant).unwrap();
        assert!(url.starts_with(
            "https://cdn.example.com/titles/42/master.m3u8?token=exp%3D1800000300~acl%3D%2Ftitles%2F42%2F%2A~sid%3D"
        ), "{url}");
        let _ = SystemTime::now();
    }

    #[test]
    fn a_short_or_malformed_secret_is_refused() {
        for secret in ["abcd", "zz".repeat(32).as_str(), ""] {
            let entry = EdgeEntry {
                base_url: "https://cdn.example.com".into(),
                secret_env: "EDGE".into(),
            };
            let owned = secret.to_owned();
            let error = entry.build(&|_| Some(owned.clone())).unwrap_err();
            assert!(error.contains("EDGE"), "{error}");
        }
    }
}
