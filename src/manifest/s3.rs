//! S3 presigned GETs: AWS Signature Version 4 in query parameters (`X-Amz-Algorithm`,
//! `X-Amz-Credential`, `X-Amz-Date`, `X-Amz-Expires`, `X-Amz-SignedHeaders`,
//! `X-Amz-Signature`), made by AWS's own `aws-sigv4`, path-style
//! (`<endpoint>/<bucket>/<key>`), so any S3-compatible server checks it: S3 refuses the
//! URL once `X-Amz-Expires` seconds have passed since `X-Amz-Date`, or for another path.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use serde::Deserialize;

use super::{Grant, SignError, Signer};

/// S3 accepts presigned URLs for at most seven days.
const MAX_EXPIRY_SECS: u64 = 7 * 24 * 3600;

/// An `[origin.s3]` table of the origins file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Entry {
    /// `https://s3.<region>.amazonaws.com`, or an S3-compatible server's URL.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    /// The environment variable that holds the secret access key.
    pub secret_access_key_env: String,
}

impl S3Entry {
    /// The signer, or what is wrong with the entry.
    pub fn build(self, secret: &dyn Fn(&str) -> Option<String>) -> Result<S3Presigner, String> {
        let endpoint = self.endpoint.trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(format!(
                "s3.endpoint must be an http(s) URL, not {endpoint:?}"
            ));
        }
        for (field, value) in [
            ("s3.bucket", &self.bucket),
            ("s3.region", &self.region),
            ("s3.access_key_id", &self.access_key_id),
        ] {
            if value.is_empty() {
                return Err(format!("{field} is empty"));
            }
        }
        let secret_key = secret(&self.secret_access_key_env).ok_or_else(|| {
            format!(
                "s3.secret_access_key_env names {}, which is not set",
                self.secret_access_key_env
            )
        })?;
        Ok(S3Presigner::new(
            endpoint,
            self.bucket,
            self.region,
            self.access_key_id,
            secret_key,
        ))
    }
}

/// Presigns GETs of one bucket.
pub struct S3Presigner {
    endpoint: String,
    bucket: String,
    region: String,
    identity: Identity,
}

impl std::fmt::Debug for S3Presigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("S3Presigner")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl S3Presigner {
    pub fn new(
        endpoint: String,
        bucket: String,
        region: String,
        access_key_id: String,
        secret_access_key: String,
    ) -> Self {
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "usher origins file",
        );
        Self {
            endpoint,
            bucket,
            region,
            identity: credentials.into(),
        }
    }

    /// The presigned URL of a `method` request (GET for players; PUT uploads) of `path`
    /// in the bucket, signed at `at` for `expires_in` (at most seven days, S3's limit).
    pub fn presign(
        &self,
        method: &str,
        path: &str,
        at: SystemTime,
        expires_in: std::time::Duration,
    ) -> Result<String, SignError> {
        let failed = |e: &dyn std::fmt::Display| SignError::Signing(e.to_string());
        let url = format!("{}/{}{path}", self.endpoint, self.bucket);
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(expires_in.min(std::time::Duration::from_secs(MAX_EXPIRY_SECS)));
        // S3 signs the path as sent: encoded once, not normalized.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(at)
            .settings(settings)
            .build()
            .map_err(|e| failed(&e))?
            .into();
        let request = SignableRequest::new(
            method,
            url.as_str(),
            std::iter::empty(),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| failed(&e))?;
        let (instructions, _) = sign(request, &params).map_err(|e| failed(&e))?.into_parts();
        let mut request = http::Request::builder()
            .uri(url.as_str())
            .body(())
            .map_err(|e| failed(&e))?;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request.uri().to_string())
    }
}

impl Signer for S3Presigner {
    fn sign(&self, grant: &Grant<'_>) -> Result<String, SignError> {
        self.presign("GET", grant.path, grant.now, grant.ttl)
    }
}
