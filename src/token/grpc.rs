//! The gRPC adapter of `TokenService`: decode, call [`TokenOps`], encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::ops::{TokenOps, Validity};
use super::{DeviceToken, MAX_TOKEN_LEN, PlaybackClaims};
use crate::deadline::Deadline;
use crate::error::Error;
use crate::proto;
use crate::proto::timestamp_seconds;
use crate::proto::token_service_server::TokenService;

/// Serves `usher.v1.TokenService`.
pub struct TokenGrpc {
    ops: Arc<TokenOps>,
}

impl TokenGrpc {
    pub fn new(ops: Arc<TokenOps>) -> Self {
        Self { ops }
    }
}

fn required_token(token: &str) -> Result<(), Error> {
    if token.is_empty() {
        return Err(Error::invalid("token", "required"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::invalid(
            "token",
            format!("at most {MAX_TOKEN_LEN} bytes"),
        ));
    }
    Ok(())
}

pub fn claims_to_proto(claims: &PlaybackClaims) -> proto::TokenClaims {
    proto::TokenClaims {
        issuer: claims.iss.clone(),
        audience: claims.aud.clone(),
        subject: claims.sub.clone(),
        session: claims.sid.clone(),
        device_id: claims.did.clone(),
        content_id: claims.cid.clone(),
        profile_id: claims.pid.clone(),
        generation: claims.r#gen,
        issue_time: Some(timestamp_seconds(claims.iat)),
        not_before: Some(timestamp_seconds(claims.nbf)),
        expire_time: Some(timestamp_seconds(claims.exp)),
        token_id: claims.jti.clone(),
        max_resolution: claims.res.unwrap_or(0),
        drm_systems: claims
            .drm
            .iter()
            .flat_map(|drm| drm.systems.iter().map(|s| s.name().to_owned()))
            .collect(),
        drm_security_level: claims
            .drm
            .as_ref()
            .and_then(|drm| drm.level)
            .map(|level| level.name().to_owned())
            .unwrap_or_default(),
        region: claims.reg.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl TokenService for TokenGrpc {
    async fn validate_token(
        &self,
        request: Request<proto::ValidateTokenRequest>,
    ) -> Result<Response<proto::ValidateTokenResponse>, Status> {
        let deadline = Deadline::of(&request);
        let request = request.into_inner();
        required_token(&request.token)?;
        let response = match self
            .ops
            .validate(&request.token, request.check_session, deadline)
            .await?
        {
            Validity::Valid(claims) => proto::ValidateTokenResponse {
                valid: true,
                claims: Some(claims_to_proto(&claims)),
                reason: String::new(),
            },
            Validity::Refused(reason) => proto::ValidateTokenResponse {
                valid: false,
                claims: None,
                reason: reason.to_owned(),
            },
        };
        Ok(Response::new(response))
    }

    async fn refresh_token(
        &self,
        request: Request<proto::RefreshTokenRequest>,
    ) -> Result<Response<proto::RefreshTokenResponse>, Status> {
        let deadline = Deadline::of(&request);
        // A device may refresh only the token it authenticated with.
        let own_token = request
            .extensions()
            .get::<DeviceToken>()
            .map(|own| own.0.clone());
        let request = request.into_inner();
        required_token(&request.token)?;
        if own_token.is_some_and(|own| *own != *request.token) {
            return Err(Error::PermissionDenied.into());
        }
        let issued = self.ops.refresh(&request.token, deadline).await?;
        Ok(Response::new(proto::RefreshTokenResponse {
            playback_token: issued.token,
            expire_time: Some(timestamp_seconds(issued.claims.exp)),
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<proto::GetJwksRequest>,
    ) -> Result<Response<proto::GetJwksResponse>, Status> {
        let keys = self
            .ops
            .tokens()
            .public_keys()
            .into_iter()
            .map(|key| proto::Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: key.x,
                kid: key.kid,
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            })
            .collect();
        Ok(Response::new(proto::GetJwksResponse { keys }))
    }
}
