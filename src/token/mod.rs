//! Playback tokens: short-lived JWTs bound to one live session, device and title.
//!
//! A token is signed by the key ring's active key (Ed25519 by default, HS256 for shared
//! secret deployments). Verification pins the algorithm to the key named by `kid` (no
//! `none`, no HS/EdDSA confusion), requires `typ: playback+jwt`, the configured `iss` and
//! `aud`, and every time claim as a number, with a small leeway. Verified tokens are
//! cached by their exact text, so a token checked again (a CDN checking every segment)
//! costs a lookup instead of a signature check; the time claims are checked again on every
//! use, and the cache is emptied whenever the keys change.

pub mod grpc;
pub mod keys;
pub mod ops;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::Validation;
use serde::{Deserialize, Serialize};

use self::keys::{KeyError, KeyRing, KeySet, PublicJwk};
use crate::error::Error;
use crate::model::{DrmRule, PlaybackRules, Session};

/// The `typ` header of every playback token.
pub const TOKEN_TYPE: &str = "playback+jwt";
/// Longer tokens are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The claims of a playback token. Every field up to `jti` is required; time claims are
/// Unix seconds and must be JSON numbers. `res`, `drm` and `reg` are present when the
/// entitlement set them, for the edge and the license server to enforce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybackClaims {
    pub iss: String,
    pub aud: String,
    /// The user.
    pub sub: String,
    /// The session's resource name, `users/{user}/sessions/{session}`.
    pub sid: String,
    /// The device.
    pub did: String,
    /// The title.
    pub cid: String,
    /// The profile.
    pub pid: String,
    /// The seat's fencing generation.
    pub r#gen: u64,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    /// The highest resolution allowed, in lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub res: Option<u32>,
    /// The DRM systems allowed (`sys`) and the minimum security level (`lvl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drm: Option<DrmRule>,
    /// The ISO 3166-1 alpha-2 region the session was admitted in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reg: Option<String>,
}

impl PlaybackClaims {
    /// The playback rules the token carries.
    pub fn rules(&self) -> PlaybackRules {
        PlaybackRules {
            max_resolution: self.res,
            drm: self.drm.clone(),
        }
    }
}

/// The playback token a device call authenticated with, as the auth layer puts it in the
/// request's extensions (a device may refresh only its own token).
#[derive(Clone, Debug)]
pub struct DeviceToken(pub Arc<str>);

/// Why a token was refused. The cause is for the log, never for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token invalid: {0}")]
    Invalid(&'static str),
}

impl TokenError {
    /// The stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Expired => "TOKEN_EXPIRED",
            TokenError::Invalid(_) => "TOKEN_INVALID",
        }
    }
}

/// Token errors in the one error type, mapped here so the error type knows no token.
impl From<TokenError> for Error {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::Expired => Error::TokenExpired,
            TokenError::Invalid(cause) => Error::TokenInvalid(cause),
        }
    }
}

/// Token behaviour fixed at start.
#[derive(Clone, Debug)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    /// Lifetime of a token.
    pub ttl: Duration,
    /// Tolerated clock difference for `exp`, `nbf` and `iat` (at most 30 s).
    pub leeway: Duration,
    /// How long after `exp` a token may still be refreshed.
    pub refresh_grace: Duration,
    /// Verified tokens kept in the cache.
    pub cache_capacity: u64,
    /// Key set file or directory; `None` for an ephemeral key.
    pub keys: Option<PathBuf>,
    /// How often the key set file is checked for changes.
    pub reload_interval: Duration,
}

impl TokenSettings {
    /// How long a retired key must keep verifying: until every token it signed is past
    /// its refresh grace.
    pub fn trust_retired(&self) -> Duration {
        self.ttl + self.refresh_grace + self.leeway
    }
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            issuer: "usher".into(),
            audience: "usher-playback".into(),
            ttl: Duration::from_secs(15 * 60),
            leeway: Duration::from_secs(10),
            refresh_grace: Duration::from_secs(5 * 60),
            cache_capacity: 100_000,
            keys: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

/// The system clock in Unix seconds, the unit of every JWT time claim.
pub(crate) fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A freshly signed token.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: String,
    pub claims: PlaybackClaims,
}

/// The keys in force, numbered: every reload makes a new epoch.
struct Ring {
    keys: KeyRing,
    epoch: u64,
}

/// A verified token: its claims, the epoch of the ring that verified its signature, and
/// the trust window of the key that signed it. An entry from an older epoch is a miss, so
/// a verification racing a reload can never leave a removed key's token in the cache.
struct Verified {
    claims: Arc<PlaybackClaims>,
    epoch: u64,
    retired: Option<keys::Retirement>,
}

/// Issues and verifies playback tokens with the keys in force.
pub struct Tokens {
    settings: TokenSettings,
    ring: ArcSwap<Ring>,
    cache: moka::sync::Cache<Arc<str>, Arc<Verified>>,
}

impl Tokens {
    pub fn new(settings: TokenSettings, ring: KeyRing) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(settings.cache_capacity)
            .time_to_live(settings.ttl + settings.refresh_grace + settings.leeway)
            .build();
        Self {
            settings,
            ring: ArcSwap::from_pointee(Ring {
                keys: ring,
                epoch: 0,
            }),
            cache,
        }
    }

    /// Loads the configured key set, or makes an ephemeral key (with a warning).
    pub fn load(settings: TokenSettings) -> Result<Self, KeyError> {
        let ring = match &settings.keys {
            Some(path) => KeyRing::from_set(&KeySet::load(path)?, settings.trust_retired())
                .map_err(|e| e.in_file(path))?,
            None => {
                tracing::warn!(
                    "no token keys configured (--token-keys): using an ephemeral Ed25519 key; \
                     tokens will not survive a restart and other instances cannot verify them"
                );
                KeyRing::ephemeral()?
            }
        };
        tracing::info!(kid = %ring.signer.kid, verifying = ring.verifiers.len(), "token keys loaded");
        Ok(Self::new(settings, ring))
    }

    /// Reads the key set again; on success the new keys are in force at once and cached
    /// verifications are dropped. On failure the keys in force stay.
    pub fn reload(&self) -> Result<(), KeyError> {
        let Some(path) = &self.settings.keys else {
            return Ok(());
        };
        let ring = KeyRing::from_set(&KeySet::load(path)?, self.settings.trust_retired())
            .map_err(|e| e.in_file(path))?;
        tracing::info!(kid = %ring.signer.kid, verifying = ring.verifiers.len(), "token keys reloaded");
        self.replace_keys(ring);
        Ok(())
    }

    pub fn replace_keys(&self, ring: KeyRing) {
        let epoch = self.ring.load().epoch + 1;
        self.ring.store(Arc::new(Ring { keys: ring, epoch }));
        // Entries of older epochs are misses anyway; this frees their memory.
        self.cache.invalidate_all();
    }

    pub fn public_keys(&self) -> Vec<PublicJwk> {
        self.ring.load().keys.public_keys()
    }

    /// Signs a token for a live session, carrying the entitlement's playback `rules` and
    /// the region the session was admitted in.
    pub fn issue(&self, session: &Session, rules: &PlaybackRules) -> Result<IssuedToken, Error> {
        let now = now_seconds();
        let claims = PlaybackClaims {
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
            sub: session.name.user.to_string(),
            sid: session.name.to_string(),
            did: session.device.id.to_string(),
            cid: session.content.to_string(),
            pid: session.profile.to_string(),
            r#gen: session.generation,
            iat: now,
            nbf: now,
            exp: now + self.settings.ttl.as_secs(),
            jti: uuid::Uuid::new_v4().to_string(),
            res: rules.max_resolution,
            drm: rules.drm.clone(),
            reg: session.client.region().map(str::to_owned),
        };
        let token = self
            .ring
            .load()
            .keys
            .signer
            .sign(&claims)
            .map_err(|e| Error::Internal(format!("signing a token: {e}")))?;
        Ok(IssuedToken { token, claims })
    }

    /// Verifies a token for use now: signature, header, issuer, audience, and the time
    /// claims with the leeway.
    pub fn verify(&self, token: &str) -> Result<Arc<PlaybackClaims>, TokenError> {
        self.verify_with_grace(token, Duration::ZERO)
    }

    /// Like [`Tokens::verify`], but a token expired less than the refresh grace ago is
    /// still accepted.
    pub fn verify_for_refresh(&self, token: &str) -> Result<Arc<PlaybackClaims>, TokenError> {
        self.verify_with_grace(token, self.settings.refresh_grace)
    }

    /// Verifies a token, counting the result and whether the cache knew it.
    fn verify_with_grace(
        &self,
        token: &str,
        grace: Duration,
    ) -> Result<Arc<PlaybackClaims>, TokenError> {
        let mut cache_hit = false;
        let verified = self.verify_counted(token, grace, &mut cache_hit);
        let result = verified
            .as_ref()
            .map_or_else(TokenError::reason, |_| "valid");
        crate::observe::token_validation(result, cache_hit);
        verified
    }

    fn verify_counted(
        &self,
        token: &str,
        grace: Duration,
        cache_hit: &mut bool,
    ) -> Result<Arc<PlaybackClaims>, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid("too long"));
        }
        let ring = self.ring.load_full();
        let verified = match self.cache.get(token) {
            Some(verified) if verified.epoch == ring.epoch => {
                *cache_hit = true;
                verified
            }
            _ => {
                let verified = Arc::new(self.verify_signed(token, &ring)?);
                self.cache.insert(Arc::from(token), verified.clone());
                verified
            }
        };
        let now = now_seconds();
        if let Some(retired) = verified.retired {
            if now > retired.trusted_until {
                return Err(TokenError::Invalid("signed by a key no longer trusted"));
            }
            // A retired key signs nothing: a token it signed after retiring is forged.
            if verified.claims.iat > retired.at + self.settings.leeway.as_secs() {
                return Err(TokenError::Invalid("issued by a retired key"));
            }
        }
        self.check_times(&verified.claims, grace, now)?;
        Ok(verified.claims.clone())
    }

    fn check_times(
        &self,
        claims: &PlaybackClaims,
        grace: Duration,
        now: u64,
    ) -> Result<(), TokenError> {
        let leeway = self.settings.leeway.as_secs();
        if claims.nbf > now.saturating_add(leeway) {
            return Err(TokenError::Invalid("not yet valid"));
        }
        if claims.iat > now.saturating_add(leeway) {
            return Err(TokenError::Invalid("issued in the future"));
        }
        if claims.exp <= claims.nbf {
            return Err(TokenError::Invalid("expires before it is valid"));
        }
        // Saturating: a signed `exp` near 2^64 is far in the future, not a wrap to the past.
        let usable_until = claims
            .exp
            .saturating_add(leeway)
            .saturating_add(grace.as_secs());
        if usable_until <= now {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    /// The signature and every claim but the times, with the algorithm pinned per key.
    fn verify_signed(&self, token: &str, ring: &Ring) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Invalid("malformed header"))?;
        if header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(TokenError::Invalid("wrong typ"));
        }
        // RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` names an
        // extension it does not understand. usher understands none.
        if header.crit.is_some() {
            return Err(TokenError::Invalid(
                "critical header extension not understood",
            ));
        }
        let kid = header.kid.ok_or(TokenError::Invalid("no kid"))?;
        let key = ring
            .keys
            .verifiers
            .get(&kid)
            .ok_or(TokenError::Invalid("unknown kid"))?;
        let mut validation = Validation::new(key.algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.required_spec_claims = ["exp", "nbf", "iat", "iss", "aud", "sub"]
            .into_iter()
            .map(str::to_owned)
            .collect::<HashSet<_>>();
        let data = jsonwebtoken::decode::<PlaybackClaims>(token, &key.key, &validation).map_err(
            |error| {
                use jsonwebtoken::errors::ErrorKind;
                TokenError::Invalid(match error.kind() {
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        "algorithm not allowed for this key"
                    }
                    ErrorKind::InvalidIssuer => "wrong iss",
                    ErrorKind::InvalidAudience => "wrong aud",
                    ErrorKind::MissingRequiredClaim(_) => "missing claim",
                    ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => "malformed claims",
                    _ => "malformed token",
                })
            },
        )?;
        Ok(Verified {
            claims: Arc::new(data.claims),
            epoch: ring.epoch,
            retired: key.retired,
        })
    }

    /// Watches the key set: reloads when the file (or directory) changes. (SIGHUP, which
    /// reloads at once, is the server's: `server::spawn_hangup_handler`.)
    pub fn spawn_reloader(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let path = self.settings.keys.clone()?;
        let tokens = Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut seen = fingerprint(&path);
            let mut ticker = tokio::time::interval(tokens.settings.reload_interval);
            loop {
                ticker.tick().await;
                let now = fingerprint(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                if let Err(error) = tokens.reload() {
                    tracing::error!(%error, "token keys not reloaded: the keys in force stay");
                }
            }
        }))
    }

    /// Whether the keys come from a file that can be reloaded (an ephemeral key cannot).
    pub fn reloadable(&self) -> bool {
        self.settings.keys.is_some()
    }
}

/// What changes when a key set file or directory changes: each file's name, length and
/// modification time.
fn fingerprint(path: &std::path::Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let entries: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    let mut prints: Vec<_> = entries
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect();
    prints.sort();
    prints
}

#[cfg(test)]
mod tests {
    use super::keys::{KeyAlgorithm, KeySet, Retirement};
    use super::*;
    use crate::ids::{DeviceId, SessionName};

    fn session() -> Session {
        Session::sample(
            SessionName::parse("n", "users/u/sessions/s").unwrap(),
            DeviceId::parse("d", "d").unwrap(),
            0,
        )
    }

    fn ring() -> KeyRing {
        KeyRing::from_set(
            &KeySet::generate(KeyAlgorithm::Eddsa).unwrap(),
            Duration::ZERO,
        )
        .unwrap()
    }

    /// The same key, retired at `at` and trusted until `trusted_until`.
    fn retired_copy(
        key: &super::keys::VerifyingKey,
        at: u64,
        trusted_until: u64,
    ) -> super::keys::VerifyingKey {
        super::keys::VerifyingKey {
            algorithm: key.algorithm,
            key: key.key.clone(),
            public: key.public.clone(),
            retired: Some(Retirement { at, trusted_until }),
        }
    }

    #[test]
    fn a_verification_racing_a_reload_does_not_outlive_it() {
        let tokens = Tokens::new(TokenSettings::default(), ring());
        let token = tokens.issue(&session(), &Default::default()).unwrap().token;
        // The interleaving: the signature is checked against the old ring, the keys are
        // replaced (and the cache cleared), then the old verification is cached.
        let old_ring = tokens.ring.load_full();
        let verified = Arc::new(tokens.verify_signed(&token, &old_ring).unwrap());
        tokens.replace_keys(ring());
        tokens.cache.insert(Arc::from(token.as_str()), verified);
        assert_eq!(
            tokens.verify(&token),
            Err(TokenError::Invalid("unknown kid"))
        );
    }

    #[test]
    fn a_retired_key_stops_verifying_on_time_without_a_reload() {
        let tokens = Tokens::new(TokenSettings::default(), ring());
        let token = tokens.issue(&session(), &Default::default()).unwrap().token;
        assert!(tokens.verify(&token).is_ok(), "cached while trusted");
        // The signing key, now retired, with a trust window that has just ended.
        let old = tokens.ring.load();
        let kid = old.keys.signer.kid.clone();
        let now = now_seconds();
        let mut keys = ring();
        keys.verifiers.insert(
            kid.clone(),
            retired_copy(&old.keys.verifiers[&kid], now - 100, now - 1),
        );
        tokens.replace_keys(keys);
        assert_eq!(
            tokens.verify(&token),
            Err(TokenError::Invalid("signed by a key no longer trusted"))
        );
        assert!(
            tokens.public_keys().iter().all(|k| k.kid != kid),
            "not published either"
        );
    }

    #[test]
    fn a_token_signed_after_its_key_retired_is_forged() {
        let tokens = Tokens::new(TokenSettings::default(), ring());
        let token = tokens.issue(&session(), &Default::default()).unwrap().token;
        let old = tokens.ring.load();
        let kid = old.keys.signer.kid.clone();
        let now = now_seconds();
        // Retired a minute before this token's iat, still trusted for an hour.
        let mut keys = ring();
        keys.verifiers.insert(
            kid.clone(),
            retired_copy(&old.keys.verifiers[&kid], now - 60, now + 3600),
        );
        tokens.replace_keys(keys);
        assert_eq!(
            tokens.verify(&token),
            Err(TokenError::Invalid("issued by a retired key"))
        );
    }
}
