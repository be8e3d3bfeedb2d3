//! The HTTP entitlement provider: the static policy first, then the platform's identity
//! service (may this user play, with how many seats, on which devices) and content
//! service (may this title play in this region), asked concurrently. The contract is
//! `docs/entitlement-http.md` (`docs/entitlement-http.openapi.yaml`).
//!
//! Each service has its own pooled client, answer cache and circuit breaker. A call
//! waits at most the per-attempt timeout and never past the request's deadline; failures
//! that are safe to repeat (no connection, 502/503/504) are retried with jittered
//! backoff, a bounded number of times. When a service cannot answer, the degraded mode
//! decides: fail closed (`ENTITLEMENT_UNAVAILABLE`) or serve a stale answer.

use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{StatusCode, Url, header};
use serde::Deserialize;

use super::breaker::{Breaker, Permit, Position};
use super::cache::{AnswerCache, Fresh, Source};
use super::{
    DeviceRules, Entitlement, EntitlementError, EntitlementProvider, EntitlementQuery, Grant,
    MAX_SEAT_LIMIT, StaticPolicy, static_policy::DEFAULT_CREATE_BURST,
};
use crate::deadline::Deadline;
use crate::error::Denial;
use crate::manifest::ManifestPaths;
use crate::model::DeviceType;
use crate::store::RateLimit;

/// The largest answer body read; a longer one is garbage.
const MAX_BODY: usize = 64 * 1024;
/// The longest `Cache-Control: max-age` honoured.
const MAX_AGE_CAP: Duration = Duration::from_secs(24 * 3600);
/// The first retry waits up to this long (full jitter), doubling for each further one.
const BACKOFF_BASE: Duration = Duration::from_millis(20);
/// No attempt is started with less time than this before the deadline.
const MIN_ATTEMPT: Duration = Duration::from_millis(5);

/// What usher does when a service cannot answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DegradedMode {
    /// Refuse with `UNAVAILABLE` / `ENTITLEMENT_UNAVAILABLE`.
    #[default]
    FailClosed,
    /// Serve the last answer, if it is at most the maximum staleness old.
    ServeStale,
}

/// How the HTTP provider talks to its services.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub identity_url: Option<Url>,
    pub content_url: Option<Url>,
    /// Per attempt, and never past the request's deadline.
    pub timeout: Duration,
    /// Further attempts after a failure that is safe to repeat.
    pub retries: u32,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    /// Answers kept per service.
    pub cache_size: u64,
    /// Consecutive failures that open a service's breaker; 0 never opens it.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub degraded: DegradedMode,
    /// The oldest answer serve-stale serves.
    pub max_stale: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            identity_url: None,
            content_url: None,
            timeout: Duration::from_millis(250),
            retries: 1,
            positive_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            cache_size: 100_000,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
            degraded: DegradedMode::FailClosed,
            max_stale: Duration::from_secs(900),
        }
    }
}

/// Checks a service's base URL: http or https, with a host.
pub fn service_url(flag: &str, value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("{flag}: {value:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "{flag}: {value:?} must be an http:// or https:// URL"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{flag}: {value:?} must have no query or fragment"));
    }
    Ok(url)
}

/// The identity service's answer, as it writes it.
#[derive(Deserialize)]
struct IdentityAnswer {
    allowed: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    seat_limit: Option<u32>,
    #[serde(default)]
    devices: DeviceRules,
    /// The plan's create rate limit (`N/s`, `N/m`, `N/h` or `off`); absent: the server's.
    #[serde(default)]
    create_rate: Option<String>,
    #[serde(default)]
    create_burst: Option<u32>,
}

/// The content service's answer, as it writes it.
#[derive(Deserialize)]
struct ContentAnswer {
    available: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    manifest: Option<ManifestPaths>,
}

/// The content service's verdict: where the title's manifests are (if it said), or why
/// it may not play.
type ContentVerdict = Result<Option<ManifestPaths>, Denial>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdentityKey {
    user: String,
    profile: Option<String>,
    content: Option<String>,
    device: Option<DeviceType>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ContentKey {
    content: String,
    region: Option<String>,
}

/// One service: its URL, client, breaker and cache.
struct Service<K, V> {
    name: &'static str,
    url: Url,
    client: reqwest::Client,
    timeout: Duration,
    retries: u32,
    breaker: Breaker,
    cache: AnswerCache<K, V>,
}

/// Both services, behind the static policy.
pub struct HttpEntitlements {
    policy: StaticPolicy,
    identity: Option<Service<IdentityKey, Entitlement>>,
    content: Option<Service<ContentKey, ContentVerdict>>,
    settings: HttpSettings,
}

impl HttpEntitlements {
    pub fn new(policy: StaticPolicy, settings: HttpSettings) -> Result<Self, String> {
        let identity = match &settings.identity_url {
            Some(url) => Some(Service::new("identity", url, &settings)?),
            None => None,
        };
        let content = match &settings.content_url {
            Some(url) => Some(Service::new("content", url, &settings)?),
            None => None,
        };
        Ok(Self {
            policy,
            identity,
            content,
            settings,
        })
    }

    async fn ask_identity(
        &self,
        query: EntitlementQuery<'_>,
    ) -> Result<Option<Entitlement>, EntitlementError> {
        let Some(service) = &self.identity else {
            return Ok(None);
        };
        let key = IdentityKey {
            user: query.user.to_string(),
            profile: query.profile.map(|p| p.to_string()),
            content: query.content.map(|c| c.to_string()),
            device: query.device,
        };
        let mut url = service.endpoint("entitlements");
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("user", &key.user);
            if let Some(profile) = &key.profile {
                pairs.append_pair("profile", profile);
            }
            if let Some(content) = &key.content {
                pairs.append_pair("content", content);
            }
            if let Some(device) = key.device {
                pairs.append_pair("device_type", device.name());
            }
        }
        let fetch = async {
            let (body, max_age) = service.fetch(url, query.deadline).await?;
            let answer: IdentityAnswer = service.parse(&body)?;
            let verdict = identity_verdict(answer, query.device).map_err(|e| service.garbage(e))?;
            Ok(self.fresh(verdict, max_age))
        };
        service.cached(key, fetch).await.map(Some)
    }

    async fn ask_content(
        &self,
        query: EntitlementQuery<'_>,
    ) -> Result<ContentVerdict, EntitlementError> {
        let (Some(service), Some(content)) = (&self.content, query.content) else {
            return Ok(Ok(None));
        };
        let key = ContentKey {
            content: content.to_string(),
            region: query.region.map(str::to_owned),
        };
        let mut url = service.endpoint("availability");
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("content", &key.content);
            if let Some(region) = &key.region {
                pairs.append_pair("region", region);
            }
        }
        let fetch = async {
            let (body, max_age) = service.fetch(url, query.deadline).await?;
            let answer: ContentAnswer = service.parse(&body)?;
            let verdict = match answer.available {
                true => {
                    let paths = answer.manifest;
                    if let Some(paths) = &paths {
                        paths.check().map_err(|e| service.garbage(e))?;
                    }
                    Ok(paths)
                }
                false => Err(denial_of(answer.reason.as_deref(), Denial::Content)),
            };
            let ttl = self.ttl(verdict.is_ok(), max_age);
            Ok(Fresh {
                value: verdict,
                ttl,
            })
        };
        service.cached(key, fetch).await
    }

    fn fresh(&self, verdict: Entitlement, max_age: Option<Duration>) -> Fresh<Entitlement> {
        let ttl = self.ttl(matches!(verdict, Entitlement::Allowed(_)), max_age);
        Fresh {
            value: verdict,
            ttl,
        }
    }

    /// The service's `max-age` when it gave one, else the default for the answer.
    fn ttl(&self, positive: bool, max_age: Option<Duration>) -> Duration {
        max_age.unwrap_or(match positive {
            true => self.settings.positive_ttl,
            false => self.settings.negative_ttl,
        })
    }
}

/// The identity service's answer as an entitlement for `device`.
fn identity_verdict(
    answer: IdentityAnswer,
    device: Option<DeviceType>,
) -> Result<Entitlement, String> {
    if !answer.allowed {
        let denial = denial_of(answer.reason.as_deref(), Denial::Entitlement);
        return Ok(Entitlement::Denied(denial));
    }
    let seat_limit = match answer.seat_limit {
        Some(limit) if limit <= MAX_SEAT_LIMIT => limit,
        Some(limit) => return Err(format!("seat_limit {limit} is over {MAX_SEAT_LIMIT}")),
        None => return Err("an allowed answer without seat_limit".to_owned()),
    };
    if seat_limit == 0 {
        return Ok(Entitlement::Denied(Denial::Entitlement));
    }
    let create_rate = match &answer.create_rate {
        Some(rate) => {
            let burst = answer.create_burst.unwrap_or(DEFAULT_CREATE_BURST);
            Some(RateLimit::parse(rate, burst).map_err(|e| format!("create_rate: {e}"))?)
        }
        None => None,
    };
    Ok(match answer.devices.apply(device) {
        Ok(rules) => Entitlement::Allowed(Grant {
            seat_limit,
            rules,
            manifest: None,
            create_rate,
        }),
        Err(denial) => Entitlement::Denied(denial),
    })
}

/// The denial a service's reason names; `otherwise` for a reason usher does not know.
fn denial_of(reason: Option<&str>, otherwise: Denial) -> Denial {
    match reason.and_then(Denial::from_reason) {
        Some(denial) => denial,
        None => {
            tracing::debug!(
                ?reason,
                "an entitlement denial for a reason usher does not know"
            );
            otherwise
        }
    }
}

/// `max-age` of a `Cache-Control` header (`no-store` and `no-cache` count as 0).
fn max_age(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').map(str::trim).find_map(|directive| {
        if directive.eq_ignore_ascii_case("no-store") || directive.eq_ignore_ascii_case("no-cache")
        {
            return Some(Duration::ZERO);
        }
        let (name, seconds) = directive.split_once('=')?;
        let seconds: u64 = seconds.trim_matches('"').parse().ok()?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| Duration::from_secs(seconds).min(MAX_AGE_CAP))
    })
}

/// A failure of one attempt: whether repeating the request is safe and may help.
struct Failure {
    cause: String,
    retry: bool,
}

impl<K, V> Service<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(name: &'static str, url: &Url, settings: &HttpSettings) -> Result<Self, String> {
        // reqwest is built without a crypto provider of its own: it uses the process's,
        // ring (which tonic's TLS uses too). Installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(concat!("usher/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("the {name} service's HTTP client: {e}"))?;
        let max_stale =
            (settings.degraded == DegradedMode::ServeStale).then_some(settings.max_stale);
        Ok(Self {
            name,
            url: url.clone(),
            client,
            breaker: Breaker::new(settings.breaker_failures, settings.breaker_cooldown),
            cache: AnswerCache::new(settings.cache_size, max_stale),
            timeout: settings.timeout,
            retries: settings.retries,
        })
    }

    /// `{url}/{path}`, keeping any path the base URL has.
    fn endpoint(&self, path: &str) -> Url {
        let mut url = self.url.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(path);
        }
        url
    }

    /// The cached answer for `key`, or `fetch`'s; counted by where it came from.
    async fn cached<F>(&self, key: K, fetch: F) -> Result<V, EntitlementError>
    where
        F: Future<Output = Result<Fresh<V>, EntitlementError>>,
    {
        let answer = self.cache.get(key, fetch).await;
        match &answer {
            Ok((_, source)) => {
                crate::observe::entitlement_answer(self.name, source.as_str());
                if *source == Source::Stale {
                    tracing::warn!(
                        service = self.name,
                        "entitlement service unavailable: a stale answer served"
                    );
                }
            }
            Err(_) => crate::observe::entitlement_answer(self.name, "unavailable"),
        }
        answer.map(|(value, _)| value)
    }

    /// GETs `url` through the breaker, with retries: the body of a 200 and its
    /// `max-age`.
    async fn fetch(
        &self,
        url: Url,
        deadline: Deadline,
    ) -> Result<(Bytes, Option<Duration>), EntitlementError> {
        let permit = self.breaker.permit();
        if permit == Permit::Refused {
            crate::observe::entitlement_upstream(self.name, "refused");
            return Err(self.unavailable("its circuit breaker is open"));
        }
        let mut attempt = 0;
        let result = loop {
            match self.attempt(&url, deadline).await {
                Ok(answer) => break Ok(answer),
                Err(failure) => {
                    let backoff = BACKOFF_BASE * 2u32.saturating_pow(attempt);
                    let wait = Duration::from_micros(fastrand::u64(..=backoff.as_micros() as u64));
                    let time_left = deadline.budget(self.timeout) > wait + MIN_ATTEMPT;
                    if !failure.retry || attempt >= self.retries || !time_left {
                        break Err(failure.cause);
                    }
                    tracing::debug!(service = self.name, cause = %failure.cause, "retrying");
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
            }
        };
        self.breaker.record(permit, result.is_ok());
        crate::observe::entitlement_breaker(self.name, self.breaker.position() as u8);
        if self.breaker.position() == Position::Open && permit != Permit::Refused {
            tracing::warn!(
                service = self.name,
                "entitlement service circuit breaker open"
            );
        }
        result.map_err(|cause| self.unavailable(&cause))
    }

    /// One GET, within the per-attempt timeout and the deadline.
    async fn attempt(
        &self,
        url: &Url,
        deadline: Deadline,
    ) -> Result<(Bytes, Option<Duration>), Failure> {
        let budget = deadline.budget(self.timeout);
        if budget < MIN_ATTEMPT {
            return Err(Failure {
                cause: "the request's deadline leaves no time to ask".to_owned(),
                retry: false,
            });
        }
        let started = tokio::time::Instant::now();
        let sent = self.client.get(url.clone()).timeout(budget).send().await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                crate::observe::entitlement_upstream(self.name, "error");
                // No answer came: the GET may be sent again (a refused connection, or a
                // pooled one the service had closed). A time-out is not retried.
                return Err(Failure {
                    retry: (error.is_connect() || error.is_request()) && !error.is_timeout(),
                    cause: describe(&error),
                });
            }
        };
        let status = response.status();
        crate::observe::entitlement_latency(self.name, started.elapsed().as_secs_f64());
        if status != StatusCode::OK {
            crate::observe::entitlement_upstream(self.name, "error");
            let retry = matches!(
                status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            );
            return Err(Failure {
                cause: format!("answered HTTP {status}"),
                retry,
            });
        }
        let max_age = max_age(response.headers());
        let body = read_body(response).await;
        crate::observe::entitlement_upstream(self.name, if body.is_ok() { "ok" } else { "error" });
        body.map(|body| (body, max_age)).map_err(|cause| Failure {
            cause,
            retry: false,
        })
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, body: &[u8]) -> Result<T, EntitlementError> {
        serde_json::from_slice(body).map_err(|e| self.garbage(e.to_string()))
    }

    fn garbage(&self, cause: String) -> EntitlementError {
        self.unavailable(&format!("answered nonsense: {cause}"))
    }

    fn unavailable(&self, cause: &str) -> EntitlementError {
        EntitlementError::Unavailable(format!("the {} service: {cause}", self.name))
    }
}

/// The body, at most [`MAX_BODY`] bytes.
async fn read_body(mut response: reqwest::Response) -> Result<Bytes, String> {
    let mut body = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > MAX_BODY => {
                return Err(format!("an answer over {MAX_BODY} bytes"));
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return Ok(body.freeze()),
            Err(error) => return Err(describe(&error)),
        }
    }
}

/// A reqwest error with its causes (its own text says only "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait::async_trait]
impl EntitlementProvider for HttpEntitlements {
    async fn check(&self, query: EntitlementQuery<'_>) -> Result<Entitlement, EntitlementError> {
        let first = self.policy.decide(query);
        let Entitlement::Allowed(grant) = first else {
            return Ok(first);
        };
        let (identity, content) = tokio::join!(self.ask_identity(query), self.ask_content(query));
        // A refusal is an answer even when the other service could not give one.
        if let Ok(Some(denied @ Entitlement::Denied(_))) = identity {
            return Ok(denied);
        }
        if let Ok(Err(denial)) = content {
            return Ok(Entitlement::Denied(denial));
        }
        let manifest = content?.ok().flatten();
        // The identity service, when there is one, owns the seats and the device rules.
        Ok(match identity? {
            Some(Entitlement::Allowed(owned)) => Entitlement::Allowed(Grant { manifest, ..owned }),
            Some(denied) => denied,
            None => Entitlement::Allowed(Grant { manifest, ..grant }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> header::HeaderMap {
        let mut map = header::HeaderMap::new();
        map.insert(header::CACHE_CONTROL, value.parse().unwrap());
        map
    }

    #[test]
    fn cache_control_max_age_is_read() {
        assert_eq!(
            max_age(&headers("max-age=60")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            max_age(&headers("private, Max-Age=\"5\"")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(max_age(&headers("no-store")), Some(Duration::ZERO));
        assert_eq!(max_age(&headers("max-age=999999999")), Some(MAX_AGE_CAP));
        assert_eq!(max_age(&headers("private")), None);
        assert_eq!(max_age(&header::HeaderMap::new()), None);
    }

    #[test]
    fn service_urls_are_checked() {
        assert!(service_url("--x", "http://127.0.0.1:8080/v1").is_ok());
        assert!(
            service_url("--x", "ftp://host")
                .unwrap_err()
                .contains("--x")
        );
        assert!(service_url("--x", "http://host/?a=1").is_err());
        assert!(service_url("--x", "not a url").is_err());
    }

    #[test]
    fn endpoints_keep_the_base_path() {
        let settings = HttpSettings::default();
        let url = Url::parse("http://id.internal/v1/").unwrap();
        let service: Service<String, u32> = Service::new("identity", &url, &settings).unwrap();
        assert_eq!(
            service.endpoint("entitlements").as_str(),
            "http://id.internal/v1/entitlements"
        );
    }

    #[test]
    fn identity_answers_become_entitlements() {
        let answer = |json: &str| serde_json::from_str::<IdentityAnswer>(json).unwrap();
        let allowed = answer(
            r#"{"allowed": true, "seat_limit": 3, "plan": "basic",
                "devices": {"allowed_types": ["mobile", "web"], "max_resolution": {"default": 720},
                            "drm": {"systems": ["widevine"], "min_security_level": "L3"}},
                "future_field": 1}"#,
        );
        let Entitlement::Allowed(grant) = identity_verdict(allowed, Some(DeviceType::Web)).unwrap()
        else {
            panic!("allowed");
        };
        assert_eq!(grant.seat_limit, 3);
        assert_eq!(grant.rules.max_resolution, Some(720));
        let tv =
            answer(r#"{"allowed": true, "seat_limit": 3, "devices": {"allowed_types": ["web"]}}"#);
        assert_eq!(
            identity_verdict(tv, Some(DeviceType::Tv)).unwrap(),
            Entitlement::Denied(Denial::DeviceNotAllowed)
        );
        let denied = answer(r#"{"allowed": false, "reason": "ACCOUNT_SUSPENDED"}"#);
        assert_eq!(
            identity_verdict(denied, None).unwrap(),
            Entitlement::Denied(Denial::AccountSuspended)
        );
        let unknown = answer(r#"{"allowed": false, "reason": "SOMETHING_NEW"}"#);
        assert_eq!(
            identity_verdict(unknown, None).unwrap(),
            Entitlement::Denied(Denial::Entitlement)
        );
        let trial = answer(
            r#"{"allowed": true, "seat_limit": 1, "create_rate": "2/h", "create_burst": 1}"#,
        );
        let Entitlement::Allowed(grant) = identity_verdict(trial, None).unwrap() else {
            panic!("allowed");
        };
        assert_eq!(grant.create_rate, Some(RateLimit::parse("2/h", 1).unwrap()));
        let bad_rate = answer(r#"{"allowed": true, "seat_limit": 1, "create_rate": "often"}"#);
        assert!(identity_verdict(bad_rate, None).is_err());
        assert!(identity_verdict(answer(r#"{"allowed": true}"#), None).is_err());
        assert!(identity_verdict(answer(r#"{"allowed": true, "seat_limit": 101}"#), None).is_err());
    }
}
