//! Signing keys: the key set file, its generation and rotation, and the [`KeyRing`] built
//! from it.
//!
//! A key set is a JWK Set (RFC 7517) whose entries keep their private parts, plus two usher
//! members: `usher_status` (`active`: the one key that signs; `retired`: verifies only) and
//! `usher_retired_at` (Unix seconds). Ed25519 keys are OKP JWKs (RFC 8037: `x` public,
//! `d` private seed); HS256 keys are `oct` JWKs (`k`). A retired key stays until every
//! token it signed has expired (token TTL + refresh grace + leeway after retirement); the
//! server stops trusting it then, and `usher keys rotate` removes it from the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

use super::now_seconds;

/// What signs tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// Ed25519 (EdDSA): the default; verifiable offline from the public JWKS.
    Eddsa,
    /// HMAC-SHA256 with a shared secret: for deployments whose verifiers share it.
    Hs256,
}

/// One key as stored in a key set file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredKey {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    pub alg: String,
    pub kid: String,
    #[serde(rename = "use", default = "signature_use")]
    pub key_use: String,
    /// Ed25519 public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// Ed25519 private seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
    /// HMAC secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<String>,
    pub usher_status: KeyStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usher_retired_at: Option<u64>,
}

fn signature_use() -> String {
    "sig".to_owned()
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Retired,
}

/// A key set file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<StoredKey>,
}

/// Why a key set could not be made, read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness: {0}")]
    Random(getrandom::Error),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a key set: {source}", path.display())]
    Syntax {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot encode the key set: {0}")]
    Encode(serde_json::Error),
    /// One key is unusable.
    #[error("key {kid}: {problem}")]
    Key { kid: String, problem: String },
    /// The set as a whole is unusable.
    #[error("{0}")]
    Set(&'static str),
    /// What is wrong, and in which file.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<KeyError>,
    },
}

impl KeyError {
    fn key(kid: &str, problem: impl Into<String>) -> Self {
        KeyError::Key {
            kid: kid.to_owned(),
            problem: problem.into(),
        }
    }

    /// This error, said of `path`.
    pub fn in_file(self, path: &Path) -> Self {
        KeyError::InFile {
            path: path.to_owned(),
            source: Box::new(self),
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(KeyError::Random)?;
    Ok(bytes)
}

/// A new key id: the algorithm, the date and 8 random hex digits.
fn new_kid(algorithm: KeyAlgorithm) -> Result<String, KeyError> {
    let random: [u8; 4] = random_bytes()?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let tag = match algorithm {
        KeyAlgorithm::Eddsa => "ed",
        KeyAlgorithm::Hs256 => "hs",
    };
    Ok(format!("{tag}-{}-{hex}", now_seconds()))
}

impl StoredKey {
    /// A new random key, active.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        let kid = new_kid(algorithm)?;
        Ok(match algorithm {
            KeyAlgorithm::Eddsa => {
                let seed: [u8; 32] = random_bytes()?;
                let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
                StoredKey {
                    kty: "OKP".into(),
                    crv: Some("Ed25519".into()),
                    alg: "EdDSA".into(),
                    kid,
                    key_use: signature_use(),
                    x: Some(B64.encode(signing.verifying_key().to_bytes())),
                    d: Some(B64.encode(seed)),
                    k: None,
                    usher_status: KeyStatus::Active,
                    usher_retired_at: None,
                }
            }
            KeyAlgorithm::Hs256 => {
                let secret: [u8; 32] = random_bytes()?;
                StoredKey {
                    kty: "oct".into(),
                    crv: None,
                    alg: "HS256".into(),
                    kid,
                    key_use: signature_use(),
                    x: None,
                    d: None,
                    k: Some(B64.encode(secret)),
                    usher_status: KeyStatus::Active,
                    usher_retired_at: None,
                }
            }
        })
    }
}

impl KeySet {
    /// A key set with one new active key.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        Ok(Self {
            keys: vec![StoredKey::generate(algorithm)?],
        })
    }

    /// Adds a new active key and retires the current one (it keeps verifying). Keys retired
    /// longer than `keep_retired` ago are removed.
    pub fn rotate(
        &mut self,
        algorithm: KeyAlgorithm,
        keep_retired: Duration,
    ) -> Result<(), KeyError> {
        let now = now_seconds();
        for key in &mut self.keys {
            if key.usher_status == KeyStatus::Active {
                key.usher_status = KeyStatus::Retired;
                key.usher_retired_at = Some(now);
            }
        }
        self.keys.retain(|key| {
            key.usher_retired_at
                .is_none_or(|at| at + keep_retired.as_secs() >= now)
        });
        self.keys.push(StoredKey::generate(algorithm)?);
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| KeyError::Syntax {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads a key set file, or every `*.json` key set in a directory, merged.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        if !path.is_dir() {
            return Self::read(path);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| KeyError::Read {
                path: path.to_owned(),
                source,
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        let mut merged = KeySet::default();
        for file in files {
            merged.keys.extend(Self::read(&file)?.keys);
        }
        Ok(merged)
    }

    /// Writes the key set, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        let text = serde_json::to_string_pretty(self).map_err(KeyError::Encode)?;
        let temporary = path.with_extension("json.tmp");
        write_private(&temporary, &text)?;
        std::fs::rename(&temporary, path).map_err(|source| KeyError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Write {
        path: path.to_owned(),
        source,
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error(path))?;
    file.write_all(text.as_bytes()).map_err(write_error(path))
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> Result<(), KeyError> {
    std::fs::write(path, text).map_err(write_error(path))
}

/// A public key as published in the JWKS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicJwk {
    pub kid: String,
    pub x: String,
}

/// A key that verifies, with its algorithm pinned.
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    pub public: Option<PublicJwk>,
    /// For a retired key: when it was retired, and until when it is trusted (Unix
    /// seconds). Checked on every verification, so a running server stops trusting it on
    /// time without a reload.
    pub retired: Option<Retirement>,
}

/// When a retired key stopped signing, and when it stops verifying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retirement {
    pub at: u64,
    pub trusted_until: u64,
}

impl VerifyingKey {
    /// Still trusted at `now` (Unix seconds).
    pub fn trusted_at(&self, now: u64) -> bool {
        self.retired.is_none_or(|r| now <= r.trusted_until)
    }
}

/// The key that signs, its material parsed once: re-reading a PKCS#8 key and deriving
/// its public half for every token was a fifth of a create's CPU.
pub struct SigningKey {
    pub kid: String,
    pub algorithm: Algorithm,
    key: Signer,
    /// The token header (`typ`, `alg`, `kid`), base64url-encoded once.
    encoded_header: String,
}

enum Signer {
    Ed25519(ed25519_dalek::SigningKey),
    Hs256(EncodingKey),
}

impl SigningKey {
    fn new(kid: &str, key: Signer) -> Result<Self, KeyError> {
        let algorithm = match key {
            Signer::Ed25519(_) => Algorithm::EdDSA,
            Signer::Hs256(_) => Algorithm::HS256,
        };
        let mut header = jsonwebtoken::Header::new(algorithm);
        header.typ = Some(super::TOKEN_TYPE.to_owned());
        header.kid = Some(kid.to_owned());
        let header = serde_json::to_vec(&header).map_err(|e| KeyError::key(kid, e.to_string()))?;
        Ok(Self {
            kid: kid.to_owned(),
            algorithm,
            key,
            encoded_header: B64.encode(header),
        })
    }

    /// A compact JWS of `claims` (`header.payload.signature`, base64url without padding).
    pub fn sign<T: serde::Serialize>(&self, claims: &T) -> Result<String, String> {
        let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut token = String::with_capacity(self.encoded_header.len() + payload.len() * 2 + 100);
        token.push_str(&self.encoded_header);
        token.push('.');
        B64.encode_string(payload, &mut token);
        let signature = match &self.key {
            Signer::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                B64.encode(key.sign(token.as_bytes()).to_bytes())
            }
            Signer::Hs256(key) => jsonwebtoken::crypto::sign(token.as_bytes(), key, self.algorithm)
                .map_err(|e| e.to_string())?,
        };
        token.push('.');
        token.push_str(&signature);
        Ok(token)
    }
}

/// The keys in force: one signer, and every key still trusted to verify, by `kid`.
pub struct KeyRing {
    pub signer: SigningKey,
    pub verifiers: HashMap<String, VerifyingKey>,
}

/// Shows key ids only: key material never reaches a log.
impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.verifiers.keys().collect();
        kids.sort();
        f.debug_struct("KeyRing")
            .field("signer", &self.signer.kid)
            .field("verifiers", &kids)
            .finish()
    }
}

fn decode_part(kid: &str, part: &str, value: Option<&String>) -> Result<Vec<u8>, KeyError> {
    let value = value.ok_or_else(|| KeyError::key(kid, format!("no `{part}`")))?;
    B64.decode(value)
        .map_err(|e| KeyError::key(kid, format!("`{part}` is not base64url: {e}")))
}

impl KeyRing {
    /// Builds the ring from a key set. Exactly one key must be active. Retired keys older
    /// than `trust_retired` are left out.
    pub fn from_set(set: &KeySet, trust_retired: Duration) -> Result<Self, KeyError> {
        let now = now_seconds();
        let mut signer = None;
        let mut verifiers = HashMap::new();
        for stored in &set.keys {
            let kid = stored.kid.as_str();
            if kid.is_empty() || kid.len() > 128 {
                return Err(KeyError::key(kid, "a key id must be 1 to 128 characters"));
            }
            if stored.key_use != "sig" {
                return Err(KeyError::key(kid, "`use` must be sig"));
            }
            let (verifying, signing) = match (stored.kty.as_str(), stored.alg.as_str()) {
                ("OKP", "EdDSA") if stored.crv.as_deref() == Some("Ed25519") => {
                    let seed: [u8; 32] = decode_part(kid, "d", stored.d.as_ref())?
                        .try_into()
                        .map_err(|_| KeyError::key(kid, "`d` must be 32 bytes"))?;
                    let signing_key = ed25519_dalek::SigningKey::from_bytes(&seed);
                    let public = signing_key.verifying_key().to_bytes();
                    let x = decode_part(kid, "x", stored.x.as_ref())?;
                    if x != public {
                        return Err(KeyError::key(kid, "`x` does not match `d`"));
                    }
                    (
                        VerifyingKey {
                            algorithm: Algorithm::EdDSA,
                            key: DecodingKey::from_ed_der(&public),
                            retired: None,
                            public: Some(PublicJwk {
                                kid: kid.to_owned(),
                                x: B64.encode(public),
                            }),
                        },
                        Signer::Ed25519(signing_key),
                    )
                }
                ("oct", "HS256") => {
                    let secret = decode_part(kid, "k", stored.k.as_ref())?;
                    if secret.len() < 32 {
                        return Err(KeyError::key(
                            kid,
                            "an HS256 secret needs at least 32 bytes",
                        ));
                    }
                    (
                        VerifyingKey {
                            algorithm: Algorithm::HS256,
                            key: DecodingKey::from_secret(&secret),
                            public: None,
                            retired: None,
                        },
                        Signer::Hs256(EncodingKey::from_secret(&secret)),
                    )
                }
                (kty, alg) => {
                    return Err(KeyError::key(
                        kid,
                        format!(
                            "unsupported kty {kty:?} with alg {alg:?} (EdDSA on Ed25519, or HS256)"
                        ),
                    ));
                }
            };
            let mut verifying = verifying;
            match stored.usher_status {
                KeyStatus::Active => {
                    if signer.is_some() {
                        return Err(KeyError::Set(
                            "more than one active key: exactly one key must be active",
                        ));
                    }
                    signer = Some(SigningKey::new(kid, signing)?);
                }
                KeyStatus::Retired => {
                    let retired_at = stored.usher_retired_at.unwrap_or(0);
                    let trusted_until = retired_at + trust_retired.as_secs();
                    if trusted_until < now {
                        tracing::info!(
                            kid,
                            "retired key no longer trusted: every token it signed has expired"
                        );
                        continue;
                    }
                    verifying.retired = Some(Retirement {
                        at: retired_at,
                        trusted_until,
                    });
                }
            }
            if verifiers.insert(kid.to_owned(), verifying).is_some() {
                return Err(KeyError::key(kid, "the key id appears twice"));
            }
        }
        let signer = signer.ok_or(KeyError::Set(
            "no active key: exactly one key must be active",
        ))?;
        Ok(Self { signer, verifiers })
    }

    /// An in-memory Ed25519 ring, for a server started without keys.
    pub fn ephemeral() -> Result<Self, KeyError> {
        Self::from_set(&KeySet::generate(KeyAlgorithm::Eddsa)?, Duration::ZERO)
    }

    /// The public keys trusted now, for the JWKS. HS256 secrets are never published.
    pub fn public_keys(&self) -> Vec<PublicJwk> {
        let now = now_seconds();
        let mut keys: Vec<PublicJwk> = self
            .verifiers
            .values()
            .filter(|v| v.trusted_at(now))
            .filter_map(|v| v.public.clone())
            .collect();
        keys.sort_by(|a, b| a.kid.cmp(&b.kid));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_set_has_one_active_key_that_round_trips() {
        let set = KeySet::generate(KeyAlgorithm::Eddsa).unwrap();
        let text = serde_json::to_string(&set).unwrap();
        let parsed: KeySet = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, set);
        let ring = KeyRing::from_set(&parsed, Duration::from_secs(60)).unwrap();
        assert_eq!(ring.signer.kid, set.keys[0].kid);
        assert_eq!(ring.public_keys().len(), 1);
    }

    #[test]
    fn rotation_keeps_the_old_key_verifying_and_prunes_expired_ones() {
        let mut set = KeySet::generate(KeyAlgorithm::Eddsa).unwrap();
        let first = set.keys[0].kid.clone();
        set.rotate(KeyAlgorithm::Eddsa, Duration::from_secs(3600))
            .unwrap();
        let ring = KeyRing::from_set(&set, Duration::from_secs(3600)).unwrap();
        assert_ne!(ring.signer.kid, first);
        assert!(ring.verifiers.contains_key(&first));
        // Retired long enough ago: no longer trusted, and pruned by the next rotation.
        set.keys[0].usher_retired_at = Some(now_seconds() - 7200);
        let ring = KeyRing::from_set(&set, Duration::from_secs(3600)).unwrap();
        assert!(!ring.verifiers.contains_key(&first));
        set.rotate(KeyAlgorithm::Hs256, Duration::from_secs(3600))
            .unwrap();
        assert!(set.keys.iter().all(|k| k.kid != first));
        assert_eq!(set.keys.len(), 2);
    }

    #[test]
    fn broken_sets_are_refused() {
        let mut set = KeySet::generate(KeyAlgorithm::Eddsa).unwrap();
        set.keys
            .push(StoredKey::generate(KeyAlgorithm::Hs256).unwrap());
        assert!(
            KeyRing::from_set(&set, Duration::ZERO)
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
        let mut tampered = KeySet::generate(KeyAlgorithm::Eddsa).unwrap();
        let other = StoredKey::generate(KeyAlgorithm::Eddsa).unwrap();
        tampered.keys[0].x = other.x;
        assert!(
            KeyRing::from_set(&tampered, Duration::ZERO)
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
        let mut weak = KeySet::generate(KeyAlgorithm::Hs256).unwrap();
        weak.keys[0].k = Some(B64.encode([1u8; 8]));
        assert!(
            KeyRing::from_set(&weak, Duration::ZERO)
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(KeyRing::from_set(&KeySet::default(), Duration::ZERO).is_err());
    }
}
