//! The cache of one entitlement service's answers: each answer lives for its own TTL
//! (the service's `Cache-Control: max-age`, or the positive or negative default);
//! concurrent misses of one key wait for one upstream call; the size is bounded. With
//! serve-stale, every answer is also kept for the maximum staleness, to be served when
//! the service cannot answer.

use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;

use super::EntitlementError;

/// An answer and how long it may be served fresh.
#[derive(Clone, Debug)]
pub struct Fresh<V> {
    pub value: V,
    pub ttl: Duration,
}

struct ByTtl;

impl<K, V> Expiry<K, Fresh<V>> for ByTtl {
    fn expire_after_create(
        &self,
        _key: &K,
        value: &Fresh<V>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Hit,
    /// This call, or one it waited for, asked the service.
    Miss,
    /// The service could not answer; a stale answer was served.
    Stale,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
            Source::Stale => "stale",
        }
    }
}

pub struct AnswerCache<K, V> {
    fresh: Cache<K, Fresh<V>>,
    /// Answers kept for serve-stale, each for the maximum staleness after it was fetched.
    stale: Option<Cache<K, V>>,
}

impl<K, V> AnswerCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// At most `capacity` answers; `max_stale` keeps answers to serve when the service
    /// cannot answer.
    pub fn new(capacity: u64, max_stale: Option<Duration>) -> Self {
        Self {
            fresh: Cache::builder()
                .max_capacity(capacity)
                .expire_after(ByTtl)
                .build(),
            stale: max_stale.map(|ttl| {
                Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(ttl)
                    .build()
            }),
        }
    }

    /// The fresh answer for `key`, or `fetch`'s (one `fetch` for all concurrent misses
    /// of the key), or with serve-stale a stale answer when `fetch` fails.
    pub async fn get<F>(&self, key: K, fetch: F) -> Result<(V, Source), EntitlementError>
    where
        F: Future<Output = Result<Fresh<V>, EntitlementError>>,
    {
        let mut fetched = false;
        let fetch = async {
            fetched = true;
            fetch.await
        };
        let answer = self
            .fresh
            .entry(key.clone())
            .or_try_insert_with(fetch)
            .await;
        match answer {
            Ok(entry) => {
                let value = entry.into_value().value;
                if fetched && let Some(stale) = &self.stale {
                    stale.insert(key, value.clone()).await;
                }
                let source = if fetched { Source::Miss } else { Source::Hit };
                Ok((value, source))
            }
            Err(error) => match self.stale_answer(&key).await {
                Some(value) => Ok((value, Source::Stale)),
                None => Err((*error).clone()),
            },
        }
    }

    async fn stale_answer(&self, key: &K) -> Option<V> {
        self.stale.as_ref()?.get(key).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn unavailable() -> EntitlementError {
        EntitlementError::Unavailable("down".into())
    }

    #[tokio::test]
    async fn answers_live_for_their_ttl_and_misses_coalesce() {
        let cache: Arc<AnswerCache<&str, u32>> = Arc::new(AnswerCache::new(100, None));
        let calls = Arc::new(AtomicUsize::new(0));
        let ask = |ttl: Duration| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Fresh { value: 7, ttl })
            }
        };
        let many = (0..50).map(|_| cache.get("k", ask(Duration::from_secs(60))));
        let answers = futures::future::join_all(many).await;
        assert!(answers.iter().all(|a| a.as_ref().unwrap().0 == 7));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "50 concurrent misses, one call"
        );
        let (_, source) = cache.get("k", ask(Duration::ZERO)).await.unwrap();
        assert_eq!(source, Source::Hit);
        // A zero TTL is not kept.
        cache.get("z", ask(Duration::ZERO)).await.unwrap();
        let (_, source) = cache.get("z", ask(Duration::ZERO)).await.unwrap();
        assert_eq!(source, Source::Miss);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // A failure is not cached, and without serve-stale it is the answer.
        let failed = cache.get("e", async { Err(unavailable()) }).await;
        assert_eq!(failed.unwrap_err(), unavailable());
    }

    #[tokio::test]
    async fn stale_answers_are_served_only_with_serve_stale_and_only_on_failure() {
        let cache: AnswerCache<&str, u32> = AnswerCache::new(100, Some(Duration::from_secs(60)));
        let fetch = |value| async move {
            Ok(Fresh {
                value,
                ttl: Duration::ZERO,
            })
        };
        cache.get("k", fetch(1)).await.unwrap();
        // Expired at once; the service answers again: the new answer wins.
        assert_eq!(cache.get("k", fetch(2)).await.unwrap(), (2, Source::Miss));
        let degraded = cache.get("k", async { Err(unavailable()) }).await;
        assert_eq!(degraded.unwrap(), (2, Source::Stale));
        let never_seen = cache.get("other", async { Err(unavailable()) }).await;
        assert!(never_seen.is_err());
    }
}
