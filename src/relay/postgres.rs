//! The PostgreSQL sink: the durable session history. Three tables, made by the
//! migrations below, which the sink applies at start (one instance at a time, under an
//! advisory lock):
//!
//! - `playback_events`: every event, once (its id is the primary key; a redelivery does
//!   nothing);
//! - `playback_sessions`: one row per session (user, profile, device, title, started,
//!   ended, end reason, actor, operator reason, final position), upserted so that any
//!   order and any number of deliveries end in the same row;
//! - `watch_progress`: per profile and title, the latest position an event carried, by
//!   usher's clock.
//!
//! A batch is one transaction: confirmed once it committed.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Pool, PoolConfig, Runtime, Timeouts};
use tokio_postgres::NoTls;

use super::{Sink, SinkError};
use crate::proto;

/// The schema, in order; each applied once (`usher_schema` records which).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE playback_events (
    id              text PRIMARY KEY,
    type            text NOT NULL,
    time            timestamptz NOT NULL,
    session         text NOT NULL,
    user_id         text NOT NULL,
    profile_id      text NOT NULL,
    device_id       text NOT NULL,
    content_id      text NOT NULL,
    generation      bigint NOT NULL,
    position_ms     bigint NOT NULL,
    end_reason      text,
    actor           text,
    operator_reason text
);
CREATE INDEX playback_events_by_user ON playback_events (user_id, time DESC);
CREATE INDEX playback_events_by_session ON playback_events (session, time);
CREATE TABLE playback_sessions (
    session           text PRIMARY KEY,
    user_id           text NOT NULL,
    profile_id        text NOT NULL,
    device_id         text NOT NULL,
    content_id        text NOT NULL,
    generation        bigint NOT NULL,
    started           timestamptz,
    ended             timestamptz,
    end_reason        text,
    actor             text,
    operator_reason   text,
    final_position_ms bigint
);
CREATE INDEX playback_sessions_by_user ON playback_sessions (user_id, started DESC);
CREATE TABLE watch_progress (
    user_id     text NOT NULL,
    profile_id  text NOT NULL,
    content_id  text NOT NULL,
    position_ms bigint NOT NULL,
    device_id   text NOT NULL,
    updated     timestamptz NOT NULL,
    PRIMARY KEY (user_id, profile_id, content_id)
);
"#];

/// The events that end a session.
const ENDINGS: [&str; 4] = [
    "playback.stopped",
    "playback.terminated",
    "playback.expired",
    "playback.evicted",
];

pub struct PostgresSink {
    pool: Pool,
    /// Set once the migrations are applied: at start, or at the first delivery when the
    /// database was unreachable then (usher starts and serves without it).
    migrated: tokio::sync::OnceCell<()>,
}

fn failed(what: &str) -> impl Fn(tokio_postgres::Error) -> SinkError + '_ {
    move |e| match e.as_db_error() {
        Some(db) => SinkError(format!(
            "PostgreSQL, {what}: {}: {}",
            db.code().code(),
            db.message()
        )),
        None => SinkError(format!("PostgreSQL, {what}: {e}")),
    }
}

impl PostgresSink {
    /// A sink on the database at `url` (`postgres://user@host:port/db`), its migrations
    /// applied now if the database answers, or else at the first delivery. Only a
    /// malformed URL is an error: a database that is down delays delivery, not usher.
    pub async fn connect(url: &str) -> Result<PostgresSink, SinkError> {
        let mut config = deadpool_postgres::Config::new();
        config.url = Some(url.to_owned());
        config.pool = Some(PoolConfig {
            max_size: 8,
            timeouts: Timeouts {
                wait: Some(Duration::from_secs(5)),
                create: Some(Duration::from_secs(5)),
                recycle: Some(Duration::from_secs(5)),
            },
            ..PoolConfig::default()
        });
        let pool = config
            .create_pool(Some(Runtime::Tokio1), NoTls)
            .map_err(|e| SinkError(format!("PostgreSQL at {}: {e}", super::redacted(url))))?;
        let sink = PostgresSink {
            pool,
            migrated: tokio::sync::OnceCell::new(),
        };
        if let Err(error) = sink.migrated().await {
            tracing::warn!(%error, "PostgreSQL sink: not ready yet; it migrates at its first delivery");
        }
        Ok(sink)
    }

    /// The migrations, applied once.
    async fn migrated(&self) -> Result<(), SinkError> {
        self.migrated
            .get_or_try_init(|| self.migrate())
            .await
            .map(|_| ())
    }

    /// Applies the migrations not applied yet, each in its own transaction, one
    /// instance at a time.
    async fn migrate(&self) -> Result<(), SinkError> {
        let mut client = self.client().await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS usher_schema (
                     version integer PRIMARY KEY,
                     applied timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(failed("making usher_schema"))?;
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            let version = i as i32 + 1;
            let transaction = client.transaction().await.map_err(failed("a migration"))?;
            // Instances starting together take turns.
            transaction
                .execute("SELECT pg_advisory_xact_lock(7303735)", &[])
                .await
                .map_err(failed("the migration lock"))?;
            let applied = transaction
                .query_opt(
                    "SELECT version FROM usher_schema WHERE version = $1",
                    &[&version],
                )
                .await
                .map_err(failed("reading usher_schema"))?
                .is_some();
            if !applied {
                transaction
                    .batch_execute(migration)
                    .await
                    .map_err(failed("a migration"))?;
                transaction
                    .execute(
                        "INSERT INTO usher_schema (version) VALUES ($1)",
                        &[&version],
                    )
                    .await
                    .map_err(failed("recording a migration"))?;
                tracing::info!(version, "PostgreSQL sink: migration applied");
            }
            transaction.commit().await.map_err(failed("a migration"))?;
        }
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, SinkError> {
        self.pool
            .get()
            .await
            .map_err(|e| SinkError(format!("PostgreSQL connection: {e}")))
    }
}

fn time_of(event: &proto::Event) -> std::time::SystemTime {
    event
        .time
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .unwrap_or(std::time::UNIX_EPOCH)
}

fn position_of(event: &proto::Event) -> i64 {
    event
        .position
        .as_ref()
        .map_or(0, |d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
}

fn text(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

#[async_trait]
impl Sink for PostgresSink {
    fn group(&self) -> &str {
        "relay-postgres"
    }

    async fn deliver(&self, events: &[proto::Event]) -> Result<(), SinkError> {
        self.migrated().await?;
        let mut client = self.client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(failed("a transaction"))?;
        let insert_event = transaction
            .prepare_cached(
                "INSERT INTO playback_events (id, type, time, session, user_id, profile_id,
                     device_id, content_id, generation, position_ms, end_reason, actor,
                     operator_reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await
            .map_err(failed("preparing"))?;
        // Whatever the order and number of deliveries: the start is the started event's
        // time, the end the ending event's, the rest the same in every event.
        let upsert_session = transaction
            .prepare_cached(
                "INSERT INTO playback_sessions AS s (session, user_id, profile_id, device_id,
                     content_id, generation, started, ended, end_reason, actor,
                     operator_reason, final_position_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (session) DO UPDATE SET
                     started = COALESCE(s.started, EXCLUDED.started),
                     ended = COALESCE(s.ended, EXCLUDED.ended),
                     end_reason = COALESCE(s.end_reason, EXCLUDED.end_reason),
                     actor = COALESCE(s.actor, EXCLUDED.actor),
                     operator_reason = COALESCE(s.operator_reason, EXCLUDED.operator_reason),
                     final_position_ms = COALESCE(s.final_position_ms, EXCLUDED.final_position_ms)",
            )
            .await
            .map_err(failed("preparing"))?;
        let upsert_progress = transaction
            .prepare_cached(
                "INSERT INTO watch_progress AS w (user_id, profile_id, content_id, position_ms,
                     device_id, updated)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (user_id, profile_id, content_id) DO UPDATE SET
                     position_ms = EXCLUDED.position_ms,
                     device_id = EXCLUDED.device_id,
                     updated = EXCLUDED.updated
                 WHERE w.updated <= EXCLUDED.updated",
            )
            .await
            .map_err(failed("preparing"))?;
        for event in events {
            let time = time_of(event);
            let position = position_of(event);
            let generation = event.generation as i64;
            let end_reason = proto::EndReason::try_from(event.end_reason)
                .ok()
                .filter(|r| *r != proto::EndReason::Unspecified)
                .map(|r| r.as_str_name());
            transaction
                .execute(
                    &insert_event,
                    &[
                        &event.id,
                        &event.r#type,
                        &time,
                        &event.session,
                        &event.user_id,
                        &event.profile_id,
                        &event.device_id,
                        &event.content_id,
                        &generation,
                        &position,
                        &end_reason,
                        &text(&event.actor),
                        &text(&event.operator_reason),
                    ],
                )
                .await
                .map_err(failed("inserting an event"))?;
            let started = (event.r#type == "playback.started").then_some(time);
            let ending = ENDINGS.contains(&event.r#type.as_str());
            let ended = ending.then_some(time);
            let final_position = ending.then_some(position);
            transaction
                .execute(
                    &upsert_session,
                    &[
                        &event.session,
                        &event.user_id,
                        &event.profile_id,
                        &event.device_id,
                        &event.content_id,
                        &generation,
                        &started,
                        &ended,
                        &end_reason,
                        &text(&event.actor),
                        &text(&event.operator_reason),
                        &final_position,
                    ],
                )
                .await
                .map_err(failed("upserting a session"))?;
            if position > 0 {
                transaction
                    .execute(
                        &upsert_progress,
                        &[
                            &event.user_id,
                            &event.profile_id,
                            &event.content_id,
                            &position,
                            &event.device_id,
                            &time,
                        ],
                    )
                    .await
                    .map_err(failed("upserting progress"))?;
            }
        }
        transaction.commit().await.map_err(failed("committing"))
    }
}
