//! The tower layer that authenticates every call before it reaches a service: it reads
//! the bearer credential and the client certificate, asks the [`Authenticator`], and
//! either passes the call on with its [`Caller`] in the request extensions or answers
//! the refusal itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::net::ConnectionInfo;

use super::{Authenticator, Caller};
use crate::token::DeviceToken;

/// Installs the [`Authenticator`] in front of every service.
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

/// The `authorization: Bearer <credential>` value, if well formed.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
        .filter(|c| !c.is_empty())
}

/// The subject common names and DNS names of the client certificate rustls verified
/// against the client CA.
fn certificate_subjects(extensions: &http::Extensions) -> Vec<String> {
    let Some(certificates) = ConnectionInfo::of(extensions).and_then(ConnectionInfo::peer_certs)
    else {
        return Vec::new();
    };
    let Some(leaf) = certificates.first() else {
        return Vec::new();
    };
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Vec::new();
    };
    let mut subjects: Vec<String> = certificate
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(alternative)) = certificate.subject_alternative_name() {
        for name in &alternative.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                subjects.push((*dns).to_owned());
            }
        }
    }
    subjects
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let subjects = certificate_subjects(request.extensions());
        let bearer = bearer(request.headers()).map(str::to_owned);
        let outcome = self
            .authenticator
            .authenticate(&path, bearer.as_deref(), &subjects);
        match outcome {
            Ok(caller) => {
                match &caller {
                    Caller::Service(principal) => {
                        tracing::debug!(principal = %principal.name, method = %path, "authenticated");
                    }
                    Caller::Device { .. } => {
                        if let Some(token) = bearer {
                            request
                                .extensions_mut()
                                .insert(DeviceToken(Arc::from(token)));
                        }
                    }
                    Caller::Public | Caller::Development => {}
                }
                request.extensions_mut().insert(caller);
                // The clone is ready only if polled; take the polled one and leave the
                // clone behind (tower's documented pattern).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            Err(refusal) => {
                let request_id = uuid::Uuid::new_v4().to_string();
                tracing::warn!(
                    request_id = %request_id,
                    method = %path,
                    cause = refusal.cause,
                    "call refused"
                );
                let mut status = tonic::Status::from(refusal.error);
                if let Ok(value) = request_id.parse() {
                    status.metadata_mut().insert("x-request-id", value);
                }
                let response = status.into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
