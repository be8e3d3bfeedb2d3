//! The token operations behind `TokenService`: validate (optionally against the live
//! session), refresh, and the public key set.

use std::sync::Arc;

use async_trait::async_trait;

use super::{IssuedToken, PlaybackClaims, TokenError, Tokens};
use crate::deadline::Deadline;
use crate::error::Error;
use crate::ids::SessionName;
use crate::model::{PlaybackRules, Session, holds_seat};
use crate::store::Store;

/// Asked at every refresh: is the session still entitled? Implemented above this layer
/// (the session operations, which know the entitlement provider).
#[async_trait]
pub trait Recheck: Send + Sync + 'static {
    /// The rules the new token carries; `None` when the entitlement could not be asked
    /// (the session keeps its rules); an error when the entitlement was withdrawn (the
    /// session has been ended) or the store failed.
    async fn recheck(
        &self,
        session: &Session,
        deadline: Deadline,
    ) -> Result<Option<PlaybackRules>, Error>;
}

/// The outcome of a validation: the claims, or why the token is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validity {
    Valid(Arc<PlaybackClaims>),
    Refused(&'static str),
}

pub struct TokenOps {
    tokens: Arc<Tokens>,
    store: Arc<dyn Store>,
    recheck: Option<Arc<dyn Recheck>>,
}

impl TokenOps {
    pub fn new(tokens: Arc<Tokens>, store: Arc<dyn Store>) -> Self {
        Self {
            tokens,
            store,
            recheck: None,
        }
    }

    /// Checks the entitlement again at every refresh.
    pub fn with_recheck(mut self, recheck: Arc<dyn Recheck>) -> Self {
        self.recheck = Some(recheck);
        self
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The session the token names, if it holds its seat with the token's generation
    /// now, by the store's clock: reading a session past its heartbeat deadline ends it
    /// (see `Store::get_session`). An ended session is `SessionEnded` with its state.
    async fn live_session(
        &self,
        claims: &PlaybackClaims,
        deadline: Deadline,
    ) -> Result<Session, Error> {
        let name = SessionName::parse("sid", &claims.sid)
            .map_err(|_| Error::from(TokenError::Invalid("malformed sid")))?;
        if name.user.as_str() != claims.sub {
            return Err(TokenError::Invalid("sid and sub disagree").into());
        }
        let session = self
            .store
            .get_session(&name, deadline)
            .await
            .map_err(|e| e.into_error(|| name.to_string()))?;
        match session {
            Some(session) if holds_seat(session.state) && session.generation == claims.r#gen => {
                Ok(session)
            }
            Some(session) => Err(Error::SessionEnded {
                state: Some(session.state.to_proto()),
            }),
            // Its record is gone: it ended longer ago than the retention.
            None => Err(Error::SessionEnded { state: None }),
        }
    }

    pub async fn validate(
        &self,
        token: &str,
        check_session: bool,
        deadline: Deadline,
    ) -> Result<Validity, Error> {
        let claims = match self.tokens.verify(token) {
            Ok(claims) => claims,
            Err(error) => return Ok(Validity::Refused(error.reason())),
        };
        if check_session {
            match self.live_session(&claims, deadline).await {
                Ok(_) => {}
                Err(Error::SessionEnded { .. }) => return Ok(Validity::Refused("SESSION_ENDED")),
                Err(error @ (Error::TokenExpired | Error::TokenInvalid(_))) => {
                    return Ok(Validity::Refused(error.code_and_reason().1));
                }
                Err(other) => return Err(other),
            }
        }
        Ok(Validity::Valid(claims))
    }

    /// A new token for the token's live session, once the entitlement has been asked
    /// again. Stateless, so concurrent refreshes of one token each get a valid token and
    /// change nothing else.
    pub async fn refresh(&self, token: &str, deadline: Deadline) -> Result<IssuedToken, Error> {
        let claims = self.tokens.verify_for_refresh(token)?;
        let session = self.live_session(&claims, deadline).await?;
        let rules = match &self.recheck {
            Some(recheck) => recheck.recheck(&session, deadline).await?,
            None => None,
        };
        let rules = rules.unwrap_or_else(|| claims.rules());
        self.tokens.issue(&session, &rules)
    }
}
