//! Manifest URLs: where a session's player fetches the title's HLS or DASH manifest,
//! signed for a short time by the signer of the title's origin, so that access ends
//! within one URL lifetime of the session's end.
//!
//! An origin serves the titles whose content id starts with its prefix; the first
//! origin that matches signs. Two signers sit behind [`Signer`]:
//!
//! - [`s3::S3Presigner`]: an S3 (or S3-compatible: MinIO, Ceph, R2) presigned GET,
//!   AWS Signature Version 4 in query parameters, made by AWS's `aws-sigv4`.
//! - [`edge::EdgeTokenSigner`]: an HMAC-SHA256 token that a CDN checks at the edge,
//!   covering the manifest's directory (and so its segments) until it expires; its format
//!   is in [`edge`], written so an edge can verify it.
//!
//! The origins come from a TOML file ([`OriginsFile`]); secrets are named by environment
//! variable, never written in it.

pub mod edge;
pub mod s3;

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::files::{FileError, read_toml};
use crate::ids::{ContentId, SessionName};

/// Which manifest a player wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestType {
    Hls,
    Dash,
}

/// A signed manifest URL and when it stops working.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub url: String,
    pub kind: ManifestType,
    pub expires: SystemTime,
}

/// Where a title's manifests are on its origin, when the content service says so
/// (instead of the origin's path templates).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ManifestPaths {
    #[serde(default)]
    pub hls: Option<String>,
    #[serde(default)]
    pub dash: Option<String>,
}

/// The longest manifest path taken from a content service.
const MAX_PATH: usize = 1024;

impl ManifestPaths {
    pub fn get(&self, kind: ManifestType) -> Option<&str> {
        match kind {
            ManifestType::Hls => self.hls.as_deref(),
            ManifestType::Dash => self.dash.as_deref(),
        }
    }

    /// Each path is absolute, at most 1024 bytes of visible ASCII, without a query, a
    /// fragment, a percent sign or a dot segment: it cannot leave the title's origin or
    /// change what is signed.
    pub fn check(&self) -> Result<(), String> {
        for path in [&self.hls, &self.dash].into_iter().flatten() {
            let visible = path.bytes().all(|b| b.is_ascii_graphic());
            let dot_segment = path.split('/').any(|s| s == "." || s == "..");
            let ok = path.starts_with('/')
                && !path.starts_with("//")
                && path.len() <= MAX_PATH
                && visible
                && !dot_segment
                && !path.contains(['?', '#', '%', '\\']);
            if !ok {
                return Err(format!(
                    "manifest path {path:?} is not an absolute path on the origin"
                ));
            }
        }
        Ok(())
    }
}

/// What a URL is signed for: one session's path, from `now` for `ttl`.
#[derive(Clone, Copy, Debug)]
pub struct Grant<'a> {
    pub session: &'a SessionName,
    /// The manifest's absolute path on the origin (`/titles/42/master.m3u8`).
    pub path: &'a str,
    pub now: SystemTime,
    pub ttl: Duration,
}

/// Signs a path of one origin into a URL that works for the grant's time.
pub trait Signer: Send + Sync + std::fmt::Debug {
    fn sign(&self, grant: &Grant<'_>) -> Result<String, SignError>;
}

/// A URL that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no origin serves content {0}")]
    NoOrigin(String),
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// A bad origins file or origin: what is wrong, naming the origin and the field.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("origin {origin}: {problem}")]
    Invalid { origin: String, problem: String },
}

/// One origin: the titles it serves, where their manifests are, who signs.
#[derive(Debug)]
pub struct Origin {
    pub name: String,
    /// Serves the content ids that start with this ("" serves every title).
    pub content_prefix: String,
    /// The manifest's path per type, `{content}` standing for the content id.
    pub hls_path: String,
    pub dash_path: String,
    pub signer: Box<dyn Signer>,
}

impl Origin {
    /// The manifest's path of `content` on this origin.
    pub fn path(&self, content: &ContentId, kind: ManifestType) -> String {
        let template = match kind {
            ManifestType::Hls => &self.hls_path,
            ManifestType::Dash => &self.dash_path,
        };
        template.replace("{content}", content.as_str())
    }
}

/// The origins, in the order they are tried, and how long a URL lives.
#[derive(Debug)]
pub struct Origins {
    origins: Vec<Origin>,
    ttl: Duration,
}

/// How long a manifest URL lives unless configured otherwise.
pub const DEFAULT_URL_TTL: Duration = Duration::from_secs(300);

impl Origins {
    pub fn new(origins: Vec<Origin>, ttl: Duration) -> Self {
        Self { origins, ttl }
    }

    /// The origins of a TOML file ([`OriginsFile`]), their secrets read from the
    /// environment variables it names.
    pub fn from_file(path: &Path, ttl: Duration) -> Result<Self, OriginError> {
        let file: OriginsFile = read_toml(path)?;
        file.build(|name| std::env::var(name).ok(), ttl)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The origin of `content`: the first whose prefix it starts with.
    pub fn origin_of(&self, content: &ContentId) -> Option<&Origin> {
        self.origins
            .iter()
            .find(|origin| content.as_str().starts_with(&origin.content_prefix))
    }

    /// A fresh URL of `content`'s manifest for `session`, signed at `now`: at the path
    /// `paths` gives for `kind`, else at the origin's template.
    pub fn manifest(
        &self,
        session: &SessionName,
        content: &ContentId,
        kind: ManifestType,
        paths: Option<&ManifestPaths>,
        now: SystemTime,
    ) -> Result<Manifest, SignError> {
        let origin = self
            .origin_of(content)
            .ok_or_else(|| SignError::NoOrigin(content.to_string()))?;
        let path = match paths.and_then(|p| p.get(kind)) {
            Some(path) => path.to_owned(),
            None => origin.path(content, kind),
        };
        let url = origin.signer.sign(&Grant {
            session,
            path: &path,
            now,
            ttl: self.ttl,
        })?;
        Ok(Manifest {
            url,
            kind,
            expires: now + self.ttl,
        })
    }
}

/// The origins file:
///
/// ```toml
/// [[origin]]
/// name = "s3-main"
/// content_prefix = ""                      # every title (the default)
/// hls_path = "/{content}/master.m3u8"      # the defaults
/// dash_path = "/{content}/manifest.mpd"
/// [origin.s3]
/// endpoint = "https://s3.eu-west-1.amazonaws.com"
/// bucket = "titles"
/// region = "eu-west-1"
/// access_key_id = "AKIA..."
/// secret_access_key_env = "USHER_S3_SECRET"   # the variable that holds the secret
///
/// [[origin]]
/// name = "cdn"
/// content_prefix = "live-"
/// [origin.edge]
/// base_url = "https://cdn.example.com"
/// secret_env = "USHER_EDGE_SECRET"            # hex, at least 32 bytes
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginsFile {
    #[serde(default)]
    pub origin: Vec<OriginEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginEntry {
    pub name: String,
    #[serde(default)]
    pub content_prefix: String,
    #[serde(default = "default_hls_path")]
    pub hls_path: String,
    #[serde(default = "default_dash_path")]
    pub dash_path: String,
    pub s3: Option<s3::S3Entry>,
    pub edge: Option<edge::EdgeEntry>,
}

fn default_hls_path() -> String {
    "/{content}/master.m3u8".into()
}

fn default_dash_path() -> String {
    "/{content}/manifest.mpd".into()
}

impl OriginsFile {
    /// The origins, with each secret looked up by `secret(variable)`.
    pub fn build(
        self,
        secret: impl Fn(&str) -> Option<String>,
        ttl: Duration,
    ) -> Result<Origins, OriginError> {
        let mut origins = Vec::with_capacity(self.origin.len());
        for entry in self.origin {
            let invalid = |problem: String| OriginError::Invalid {
                origin: entry.name.clone(),
                problem,
            };
            for (field, path) in [
                ("hls_path", &entry.hls_path),
                ("dash_path", &entry.dash_path),
            ] {
                if !path.starts_with('/') || !path.contains("{content}") {
                    return Err(invalid(format!(
                        "{field} must be an absolute path with {{content}}, not {path:?}"
                    )));
                }
            }
            let signer: Box<dyn Signer> = match (entry.s3, entry.edge) {
                (Some(s3), None) => Box::new(s3.build(&secret).map_err(invalid)?),
                (None, Some(edge)) => Box::new(edge.build(&secret).map_err(invalid)?),
                _ => return Err(invalid("needs exactly one of [s3] or [edge]".into())),
            };
            origins.push(Origin {
                name: entry.name,
                content_prefix: entry.content_prefix,
                hls_path: entry.hls_path,
                dash_path: entry.dash_path,
                signer,
            });
        }
        if origins.is_empty() {
            return Err(OriginError::Invalid {
                origin: "(none)".into(),
                problem: "the file names no [[origin]]".into(),
            });
        }
        Ok(Origins::new(origins, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SessionId, UserId};

    fn session() -> SessionName {
        SessionName {
            user: UserId::parse("user", "u1").unwrap(),
            session: SessionId::parse("session", "0e6f4a52-8a36-4d0b-9f9b-0d4d3d6b1e11").unwrap(),
        }
    }

    const FILE: &str = r#"
        [[origin]]
        name = "live"
        content_prefix = "live-"
        hls_path = "/live/{content}/index.m3u8"
        [origin.edge]
        base_url = "https://cdn.example.com"
        secret_env = "EDGE"

        [[origin]]
        name = "vod"
        [origin.s3]
        endpoint = "http://127.0.0.1:4568"
        bucket = "titles"
        region = "us-east-1"
        access_key_id = "S3RVER"
        secret_access_key_env = "S3"
    "#;

    fn secrets(name: &str) -> Option<String> {
        match name {
            "EDGE" => {
                Some("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into())
            }
            "S3" => Some("S3RVER".into()),
            _ => None,
        }
    }

    #[test]
    fn a_content_service_path_replaces_the_template_and_is_checked() {
        let file: OriginsFile = toml::from_str(FILE).unwrap();
        let origins = file.build(secrets, DEFAULT_URL_TTL).unwrap();
        let live = ContentId::parse("content", "live-7").unwrap();
        let paths = ManifestPaths {
            hls: Some("/events/2026/final/master.m3u8".into()),
            dash: None,
        };
        paths.check().unwrap();
        let at = |kind| {
            origins
                .manifest(&session(), &live, kind, Some(&paths), SystemTime::now())
                .unwrap()
                .url
        };
        let hls = at(ManifestType::Hls);
        assert!(
            hls.starts_with("https://cdn.example.com/events/2026/final/master.m3u8?token="),
            "{hls}"
        );
        // No DASH path given: the origin's template.
        assert!(at(ManifestType::Dash).starts_with("https://cdn.example.com/live-7/manifest.mpd?"));
        for bad in [
            "relative/master.m3u8",
            "//other.host/x.m3u8",
            "/a/../b.m3u8",
            "/a.m3u8?x=1",
            "/a%2e.m3u8",
            "/a b.m3u8",
        ] {
            let paths = ManifestPaths {
                hls: Some(bad.into()),
                dash: None,
            };
            assert!(paths.check().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_origin_whose_prefix_matches_signs() {
        let file: OriginsFile = toml::from_str(FILE).unwrap();
        let origins = file.build(secrets, DEFAULT_URL_TTL).unwrap();
        let now = SystemTime::now();
        let live = ContentId::parse("content", "live-7").unwrap();
        let manifest = origins
            .manifest(&session(), &live, ManifestType::Hls, None, now)
            .unwrap();
        assert!(
            manifest
                .url
                .starts_with("https://cdn.example.com/live/live-7/index.m3u8?token="),
            "{}",
            manifest.url
        );
        assert_eq!(manifest.expires, now + DEFAULT_URL_TTL);
        let vod = ContentId::parse("content", "title-42").unwrap();
        let manifest = origins
            .manifest(&session(), &vod, ManifestType::Dash, None, now)
            .unwrap();
        assert!(
            manifest
                .url
                .starts_with("http://127.0.0.1:4568/titles/title-42/manifest.mpd?"),
            "{}",
            manifest.url
        );
        assert!(
            manifest.url.contains("X-Amz-Expires=300"),
            "{}",
            manifest.url
        );
    }

    #[test]
    fn a_bad_origin_is_refused_naming_it_and_the_field() {
        let cases = [
            (
                FILE.replace("secret_env = \"EDGE\"", "secret_env = \"NONE\""),
                "NONE",
            ),
            (
                FILE.replace("/live/{content}/index.m3u8", "live.m3u8"),
                "hls_path",
            ),
            (
                FILE.replace("[origin.edge]", "[origin.s3x]"),
                "unknown field",
            ),
            (
                FILE.replace("bucket = \"titles\"", "bucket = \"\""),
                "bucket",
            ),
            ("origin = []".to_owned(), "no [[origin]]"),
        ];
        for (text, named) in cases {
            let error = toml::from_str::<OriginsFile>(&text)
                .map_err(|e| e.to_string())
                .and_then(|file| {
                    file.build(secrets, DEFAULT_URL_TTL)
                        .map_err(|e| e.to_string())
                });
            let error = error.expect_err(named);
            assert!(error.contains(named), "{named}: {error}");
        }
    }

    #[test]
    fn content_no_origin_serves_is_an_error() {
        let file: OriginsFile = toml::from_str(&FILE.replace(
            "name = \"vod\"",
            "name = \"vod\"\ncontent_prefix = \"title-\"",
        ))
        .unwrap();
        let origins = file.build(secrets, DEFAULT_URL_TTL).unwrap();
        let other = ContentId::parse("content", "clip-1").unwrap();
        assert!(matches!(
            origins.manifest(
                &session(),
                &other,
                ManifestType::Hls,
                None,
                SystemTime::now()
            ),
            Err(SignError::NoOrigin(_))
        ));
    }
}
