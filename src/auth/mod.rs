//! Who may call what. Every call is classified by its method ([`access_of`]) and its
//! caller authenticated once, in the tower layer ([`layer`]), before any service runs:
//!
//! - device calls (Heartbeat, Pause, Resume, Stop) carry the session's playback token as
//!   `authorization: Bearer <token>`; the handler then binds the call to the token's
//!   session and generation (`session::ops::bind_device`). A service credential there is refused
//!   with `PERMISSION_DENIED` / `PLAYBACK_TOKEN_REQUIRED` (so a device is not told to
//!   start over), unless one of its roles names the device method exactly (the built-in
//!   `device-proxy` role names all four): such a service acts for devices, without the
//!   token binding. A `Service/*` pattern never covers a device method;
//! - internal calls carry a service key (`Bearer <key>`) or a client certificate, each
//!   mapped to a named principal with roles, and each role allows a set of methods. A
//!   bearer with exactly two `.` is a playback token (JWS compact form), anything else a
//!   service key, so keys may not contain `.` (refused when the credentials load);
//! - health and reflection are public.
//!
//! Rejections are `UNAUTHENTICATED` (no or bad credentials) or `PERMISSION_DENIED` (the
//! role does not allow the method), with nothing that helps an attacker; the cause goes to
//! the log under a request id that is also returned as `x-request-id`.

pub mod layer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::files::{FileError, read_toml};
use crate::store::RateLimit;
use crate::token::{PlaybackClaims, TokenError, Tokens};

/// How a method is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Health and reflection: anyone.
    Public,
    /// A device call: the session's playback token.
    Device,
    /// RefreshToken: a service key with the method in a role, or the playback token being
    /// refreshed (a device refreshing its own token).
    Refresh,
    /// Watch progress (`ProgressService`): a service key with the method in a role, or a
    /// playback token, which reaches only its own user's profile (the operations check).
    Viewer,
    /// The device stream: the playback token alone, which names the session (no
    /// service acts for a device on it, and `--insecure-dev` does not waive it).
    Stream,
    /// Everything else: a service key or client certificate whose roles allow it.
    Internal,
}

/// The device stream's path, without the leading `/`.
pub const STREAM_METHOD: &str = "usher.v1.StreamingService/StreamHeartbeats";

const DEVICE_METHODS: [&str; 5] = [
    "usher.v1.PlaybackSessionService/GetManifest",
    "usher.v1.PlaybackSessionService/Heartbeat",
    "usher.v1.PlaybackSessionService/PauseSession",
    "usher.v1.PlaybackSessionService/ResumeSession",
    "usher.v1.PlaybackSessionService/StopSession",
];

/// The access rule of a gRPC path (`/package.Service/Method`). Unknown paths are
/// internal: they need credentials before the router says UNIMPLEMENTED.
pub fn access_of(path: &str) -> Access {
    let method = path.trim_start_matches('/');
    if method.starts_with("grpc.health.v1.Health/")
        || method.starts_with("grpc.reflection.v1.ServerReflection/")
        || method.starts_with("grpc.reflection.v1alpha.ServerReflection/")
    {
        Access::Public
    } else if DEVICE_METHODS.contains(&method) {
        Access::Device
    } else if method == STREAM_METHOD {
        Access::Stream
    } else if method == "usher.v1.TokenService/RefreshToken" {
        Access::Refresh
    } else if method.starts_with("usher.v1.ProgressService/") {
        Access::Viewer
    } else {
        Access::Internal
    }
}

/// The built-in roles and the methods they allow. Patterns end in `/*` for a whole
/// service. The credentials file may add roles.
pub fn builtin_roles() -> HashMap<String, Vec<String>> {
    let role = |methods: &[&str]| methods.iter().map(|m| (*m).to_owned()).collect();
    HashMap::from([
        (
            "admin".to_owned(),
            role(&[
                "usher.v1.PlaybackSessionService/*",
                "usher.v1.ConcurrencyService/*",
                "usher.v1.TokenService/*",
                "usher.v1.EventService/*",
            ]),
        ),
        (
            "playback-api".to_owned(),
            role(&[
                "usher.v1.PlaybackSessionService/CreateSession",
                "usher.v1.PlaybackSessionService/GetSession",
                "usher.v1.PlaybackSessionService/ListSessions",
                "usher.v1.ConcurrencyService/*",
                "usher.v1.TokenService/*",
                "usher.v1.ProgressService/*",
            ]),
        ),
        (
            "support".to_owned(),
            role(&[
                "usher.v1.PlaybackSessionService/GetSession",
                "usher.v1.PlaybackSessionService/ListSessions",
                "usher.v1.PlaybackSessionService/TerminateSession",
                "usher.v1.ConcurrencyService/*",
                "usher.v1.ProgressService/GetProgress",
                "usher.v1.ProgressService/ListProgress",
                "usher.v1.ProgressService/DeleteProgress",
                "usher.v1.EventService/ListEvents",
            ]),
        ),
        // Analytics, billing and audit consumers: every event as it happens.
        ("events".to_owned(), role(&["usher.v1.EventService/*"])),
        ("device-proxy".to_owned(), role(&DEVICE_METHODS)),
        (
            "edge".to_owned(),
            role(&[
                "usher.v1.TokenService/ValidateToken",
                "usher.v1.TokenService/GetJwks",
            ]),
        ),
    ])
}

fn pattern_allows(pattern: &str, method: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(service) => method
            .strip_prefix(service)
            .is_some_and(|rest| rest.starts_with('/')),
        None => pattern == method,
    }
}

/// A named caller with the methods its roles allow, and its request rate limit.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    methods: Vec<String>,
    rate: Option<LocalRate>,
}

/// A service's request rate limit in this process: a GCRA over the monotonic clock in
/// microseconds, its arrival time moved by compare-and-swap (no lock on the call path).
#[derive(Debug)]
struct LocalRate {
    limit: RateLimit,
    epoch: std::time::Instant,
    tat_us: std::sync::atomic::AtomicU64,
}

impl LocalRate {
    fn admit(&self) -> Result<(), std::time::Duration> {
        use std::sync::atomic::Ordering;
        let micro = std::time::Duration::from_micros(1);
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut tat = self.tat_us.load(Ordering::Relaxed);
        loop {
            let next = self.limit.admit_in(tat, now, micro)?;
            match self
                .tat_us
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

impl Principal {
    /// Takes one request of the principal's rate; how long to wait when over it.
    fn admit(&self) -> Result<(), std::time::Duration> {
        self.rate.as_ref().map_or(Ok(()), LocalRate::admit)
    }

    pub fn may_call(&self, method: &str) -> bool {
        self.methods.iter().any(|p| pattern_allows(p, method))
    }

    /// Whether a role names the device method exactly: only then may a service act
    /// for devices (a `Service/*` pattern does not count).
    pub fn may_act_for_devices(&self, method: &str) -> bool {
        self.methods.iter().any(|p| p == method)
    }
}

/// Who is calling, as the layer established it. Handlers read it from the request
/// extensions.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Health or reflection: no identity.
    Public,
    /// An internal service.
    Service(Arc<Principal>),
    /// A device, by its playback token.
    /// (The token itself travels beside it as a `token::DeviceToken` extension.)
    Device { claims: Arc<PlaybackClaims> },
    /// `--insecure-dev` with no credentials at all.
    Development,
}

impl Caller {
    /// Who is acting, for audit fields such as `Session.ended_by`.
    pub fn name(&self) -> &str {
        match self {
            Caller::Public => "anonymous",
            Caller::Service(principal) => &principal.name,
            Caller::Device { .. } => "device",
            Caller::Development => "development",
        }
    }
}

/// The credentials file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    #[serde(default)]
    pub service: Vec<ServiceKey>,
    #[serde(default)]
    pub client_certificate: Vec<ClientCertificate>,
    #[serde(default)]
    pub roles: HashMap<String, RoleDefinition>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceKey {
    pub name: String,
    /// The bearer key itself (at least 32 characters)…
    pub key: Option<String>,
    /// …or its SHA-256, hex, so the file holds no secret.
    pub key_sha256: Option<String>,
    pub roles: Vec<String>,
    /// Requests per second this service may make to this instance; absent: no limit.
    pub requests_per_second: Option<u32>,
    /// Requests it may make at once before the rate applies (default: one second's).
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificate {
    /// The certificate's subject common name or a DNS subject alternative name.
    pub subject: String,
    pub roles: Vec<String>,
    /// As for a service key.
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDefinition {
    pub methods: Vec<String>,
}

const MIN_KEY_LEN: usize = 32;

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Service keys (by SHA-256) and certificate subjects, each mapped to its principal.
#[derive(Debug, Default)]
pub struct Credentials {
    keys: HashMap<[u8; 32], Arc<Principal>>,
    subjects: HashMap<String, Arc<Principal>>,
}

/// Why a credentials file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: {source}", path.display())]
    InFile {
        path: std::path::PathBuf,
        source: Box<CredentialsError>,
    },
    #[error("roles.{role}: {method:?} is not a usher.v1 method (Service/Method or Service/*)")]
    NotAMethod { role: String, method: String },
    #[error("{name}: no roles")]
    NoRoles { name: String },
    #[error("{name}: unknown role {role:?}")]
    UnknownRole { name: String, role: String },
    /// A service key that could never authenticate.
    #[error("service {name}: {problem}")]
    BadKey { name: String, problem: &'static str },
    #[error("service {name}: the same key twice")]
    DuplicateKey { name: String },
    #[error("{name}: requests_per_second and burst must be 1 to 1000000")]
    BadRate { name: String },
    /// A caller's name is kept in records (`Session.ended_by`), which hold no control
    /// characters.
    #[error("{name:?}: a caller's name must be 1 to 128 characters without control characters")]
    BadName { name: String },
}

/// The request rate limit of a credential: `per_second`, and `burst` at once (default
/// one second's worth).
fn request_rate(
    name: &str,
    per_second: u32,
    burst: Option<u32>,
) -> Result<LocalRate, CredentialsError> {
    let burst = burst.unwrap_or(per_second);
    let range = 1..=1_000_000;
    if !range.contains(&per_second) || !range.contains(&burst) {
        return Err(CredentialsError::BadRate {
            name: name.to_owned(),
        });
    }
    Ok(LocalRate {
        limit: RateLimit {
            interval: std::time::Duration::from_secs(1) / per_second,
            burst,
        },
        epoch: std::time::Instant::now(),
        tat_us: std::sync::atomic::AtomicU64::new(0),
    })
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let file: CredentialsFile = read_toml(path)?;
        Self::from_file(file).map_err(|source| CredentialsError::InFile {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn from_file(file: CredentialsFile) -> Result<Self, CredentialsError> {
        let mut roles = builtin_roles();
        for (name, definition) in file.roles {
            for method in &definition.methods {
                if !method.starts_with("usher.v1.") || !method.contains('/') {
                    return Err(CredentialsError::NotAMethod {
                        role: name,
                        method: method.clone(),
                    });
                }
            }
            roles.insert(name, definition.methods);
        }
        let principal = |name: &str,
                         role_names: &[String],
                         per_second: Option<u32>,
                         burst: Option<u32>|
         -> Result<Arc<Principal>, CredentialsError> {
            if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
                return Err(CredentialsError::BadName {
                    name: name.to_owned(),
                });
            }
            if role_names.is_empty() {
                return Err(CredentialsError::NoRoles {
                    name: name.to_owned(),
                });
            }
            let mut methods = Vec::new();
            for role in role_names {
                let allowed = roles
                    .get(role)
                    .ok_or_else(|| CredentialsError::UnknownRole {
                        name: name.to_owned(),
                        role: role.clone(),
                    })?;
                methods.extend(allowed.iter().cloned());
            }
            let rate = match per_second {
                Some(per_second) => Some(request_rate(name, per_second, burst)?),
                None => None,
            };
            Ok(Arc::new(Principal {
                name: name.to_owned(),
                methods,
                rate,
            }))
        };
        let mut credentials = Credentials::default();
        for service in file.service {
            let bad_key = |problem| CredentialsError::BadKey {
                name: service.name.clone(),
                problem,
            };
            let digest = match (&service.key, &service.key_sha256) {
                (Some(key), None) if key.contains('.') => {
                    return Err(bad_key(
                        "a key must not contain '.': a bearer credential with dots is taken \
                         for a playback token, so this key could never authenticate",
                    ));
                }
                (Some(key), None) if key.len() >= MIN_KEY_LEN => sha256(key),
                (Some(_), None) => return Err(bad_key("key shorter than 32 characters")),
                (None, Some(hex)) => parse_hex_digest(hex)
                    .ok_or_else(|| bad_key("key_sha256 is not 64 hex digits"))?,
                _ => return Err(bad_key("give key or key_sha256")),
            };
            let principal = principal(
                &service.name,
                &service.roles,
                service.requests_per_second,
                service.burst,
            )?;
            if credentials.keys.insert(digest, principal).is_some() {
                return Err(CredentialsError::DuplicateKey { name: service.name });
            }
        }
        for certificate in file.client_certificate {
            let principal = principal(
                &certificate.subject,
                &certificate.roles,
                certificate.requests_per_second,
                certificate.burst,
            )?;
            credentials.subjects.insert(certificate.subject, principal);
        }
        Ok(credentials)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.subjects.is_empty()
    }

    fn by_key(&self, key: &str) -> Option<Arc<Principal>> {
        self.keys.get(&sha256(key)).cloned()
    }

    fn by_subjects(&self, subjects: &[String]) -> Option<Arc<Principal>> {
        subjects.iter().find_map(|s| self.subjects.get(s).cloned())
    }
}

/// A refusal, with the cause for the log.
#[derive(Debug)]
pub struct Refusal {
    pub error: Error,
    pub cause: &'static str,
}

/// One request of a service's rate, or RATE_LIMITED with when to retry.
fn admit(principal: &Principal) -> Result<(), Refusal> {
    principal.admit().map_err(|retry_after| {
        crate::observe::service_rate_limited(&principal.name);
        Refusal {
            error: Error::RateLimited { retry_after },
            cause: "service over its request rate",
        }
    })
}

fn unauthenticated(cause: &'static str) -> Refusal {
    Refusal {
        error: Error::Unauthenticated,
        cause,
    }
}

/// Authenticates callers: see the module docs.
pub struct Authenticator {
    /// Swapped whole on reload (SIGHUP), so a call sees the old set or the new one.
    credentials: arc_swap::ArcSwap<Credentials>,
    tokens: Arc<Tokens>,
    insecure_dev: bool,
}

impl Authenticator {
    pub fn new(credentials: Credentials, tokens: Arc<Tokens>, insecure_dev: bool) -> Self {
        Self {
            credentials: arc_swap::ArcSwap::from_pointee(credentials),
            tokens,
            insecure_dev,
        }
    }

    /// Puts new service credentials in force for the calls that start from now on.
    pub fn replace_credentials(&self, credentials: Credentials) {
        self.credentials.store(Arc::new(credentials));
    }

    /// Establishes the caller of `path`. `bearer` is the `authorization: Bearer` value,
    /// `subjects` the names of a verified client certificate.
    pub fn authenticate(
        &self,
        path: &str,
        bearer: Option<&str>,
        subjects: &[String],
    ) -> Result<Caller, Refusal> {
        let method = path.trim_start_matches('/');
        match access_of(path) {
            Access::Public => Ok(Caller::Public),
            Access::Device => match bearer {
                Some(token) if looks_like_jwt(token) => self.device(self.tokens.verify(token)),
                Some(_) => self.service_on_device_method(method, bearer, subjects),
                None if !subjects.is_empty() => {
                    self.service_on_device_method(method, bearer, subjects)
                }
                None if self.insecure_dev => Ok(Caller::Development),
                None => Err(unauthenticated("no playback token")),
            },
            Access::Stream => match bearer {
                Some(token) if looks_like_jwt(token) => self.device(self.tokens.verify(token)),
                Some(_) => {
                    self.principal(bearer, subjects)?;
                    Err(Refusal {
                        error: Error::PlaybackTokenRequired,
                        cause: "a service credential on the device stream",
                    })
                }
                None => Err(unauthenticated("no playback token on the device stream")),
            },
            Access::Refresh => match bearer {
                Some(token) if looks_like_jwt(token) => {
                    self.device(self.tokens.verify_for_refresh(token))
                }
                _ => self.internal(method, bearer, subjects),
            },
            Access::Viewer => match bearer {
                Some(token) if looks_like_jwt(token) => self.device(self.tokens.verify(token)),
                _ => self.internal(method, bearer, subjects),
            },
            Access::Internal => self.internal(method, bearer, subjects),
        }
    }

    fn device(&self, verified: Result<Arc<PlaybackClaims>, TokenError>) -> Result<Caller, Refusal> {
        match verified {
            Ok(claims) => Ok(Caller::Device { claims }),
            // UNAUTHENTICATED with TOKEN_EXPIRED or TOKEN_INVALID: a device learns to
            // refresh, or to start over; the cause stays in the log.
            Err(error) => Err(Refusal {
                cause: match &error {
                    TokenError::Expired => "playback token expired",
                    TokenError::Invalid(cause) => cause,
                },
                error: error.into(),
            }),
        }
    }

    /// A service credential on a device method: it may act for devices only when a role
    /// names the method exactly; otherwise it is told a playback token is needed.
    fn service_on_device_method(
        &self,
        method: &str,
        bearer: Option<&str>,
        subjects: &[String],
    ) -> Result<Caller, Refusal> {
        let principal = self.principal(bearer, subjects)?;
        if principal.may_act_for_devices(method) {
            admit(&principal)?;
            return Ok(Caller::Service(principal));
        }
        Err(Refusal {
            error: Error::PlaybackTokenRequired,
            cause: "a service credential on a device method",
        })
    }

    /// The principal of a service key or of a client certificate's subjects.
    fn principal(
        &self,
        bearer: Option<&str>,
        subjects: &[String],
    ) -> Result<Arc<Principal>, Refusal> {
        let credentials = self.credentials.load();
        match bearer {
            Some(key) => credentials
                .by_key(key)
                .ok_or_else(|| unauthenticated("unknown service key")),
            None => credentials
                .by_subjects(subjects)
                .ok_or_else(|| unauthenticated("client certificate subject not configured")),
        }
    }

    fn internal(
        &self,
        method: &str,
        bearer: Option<&str>,
        subjects: &[String],
    ) -> Result<Caller, Refusal> {
        let principal = match bearer {
            Some(token) if looks_like_jwt(token) => {
                return Err(unauthenticated("a playback token on an internal method"));
            }
            None if subjects.is_empty() && self.insecure_dev => return Ok(Caller::Development),
            None if subjects.is_empty() => return Err(unauthenticated("no credentials")),
            _ => self.principal(bearer, subjects)?,
        };
        if !principal.may_call(method) {
            tracing::debug!(principal = %principal.name, method, "role does not allow the method");
            return Err(Refusal {
                error: Error::PermissionDenied,
                cause: "role does not allow the method",
            });
        }
        admit(&principal)?;
        Ok(Caller::Service(principal))
    }
}

fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_classified() {
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(
            access_of("/usher.v1.PlaybackSessionService/Heartbeat"),
            Access::Device
        );
        assert_eq!(
            access_of("/usher.v1.PlaybackSessionService/CreateSession"),
            Access::Internal
        );
        assert_eq!(
            access_of("/usher.v1.TokenService/RefreshToken"),
            Access::Refresh
        );
        assert_eq!(access_of("/something.Else/Method"), Access::Internal);
        assert_eq!(
            access_of("/usher.v1.ProgressService/UpdateProgress"),
            Access::Viewer
        );
    }

    #[test]
    fn patterns_match_whole_services_or_exact_methods() {
        assert!(pattern_allows(
            "usher.v1.TokenService/*",
            "usher.v1.TokenService/GetJwks"
        ));
        assert!(!pattern_allows(
            "usher.v1.TokenService/*",
            "usher.v1.TokenServiceX/GetJwks"
        ));
        assert!(pattern_allows("a.B/C", "a.B/C"));
        assert!(!pattern_allows("a.B/C", "a.B/CD"));
    }

    #[test]
    fn credentials_files_are_checked() {
        let file = |text: &str| {
            Credentials::from_file(toml::from_str(text).unwrap()).map_err(|e| e.to_string())
        };
        assert!(
            file("[[service]]\nname='a'\nkey='short'\nroles=['admin']")
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
        assert!(
            file("[[service]]\nname='a'\nkey_sha256='abc'\nroles=['admin']")
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );
        assert!(
            file(&format!(
                "[[service]]\nname='a'\nkey='{}'\nroles=['nope']",
                "k".repeat(32)
            ))
            .unwrap_err()
            .to_string()
            .contains("unknown role")
        );
        // A caller's name is kept in ended records, which hold no control characters.
        for name in [r#""""#, r#""ops\u001Fteam""#, r#""ops\nteam""#] {
            assert!(
                file(&format!(
                    "[[service]]\nname={name}\nkey='{}'\nroles=['admin']",
                    "k".repeat(32)
                ))
                .unwrap_err()
                .contains("control characters"),
                "{name:?}"
            );
        }
        // A key with dots would be read as a playback token and could never work.
        let dotted = file(&format!(
            "[[service]]\nname='a'\nkey='{}.{}.{}'\nroles=['admin']",
            "a".repeat(12),
            "b".repeat(12),
            "c".repeat(12)
        ))
        .unwrap_err();
        assert!(dotted.contains("must not contain '.'"), "{dotted}");
        let digest: String = sha256(&"s".repeat(40))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let ok = file(&format!(
            "[[service]]\nname='edge'\nkey_sha256='{digest}'\nroles=['edge']\n[roles.reporting]\nmethods=['usher.v1.ConcurrencyService/*']"
        ))
        .unwrap();
        let edge = ok.by_key(&"s".repeat(40)).unwrap();
        assert!(edge.may_call("usher.v1.TokenService/ValidateToken"));
        assert!(!edge.may_call("usher.v1.PlaybackSessionService/CreateSession"));
    }
}
