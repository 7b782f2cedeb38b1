//! Recordings in S3-compatible object storage (AWS, Garage, MinIO, Ceph)
//! through `aws-sdk-s3`: endpoint, region, bucket, credentials and
//! path-style addressing from the configuration; expiry by a bucket
//! lifecycle rule on the recordings prefix; downloads by pre-signed URLs.

use crate::store::{Download, PREFIX, Store, StoreError};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter,
};
use std::path::Path;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct S3Settings {
    /// e.g. `https://s3.eu-central-1.amazonaws.com` or `http://127.0.0.1:3900`.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `http://host/bucket/key` rather than `http://bucket.host/key`
    /// (Garage, MinIO and most self-hosted servers want this).
    pub path_style: bool,
}

pub struct S3Store {
    client: Client,
    bucket: String,
}

/// How long a download link works.
const PRESIGN_FOR: Duration = Duration::from_secs(10 * 60);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The SDK's errors print as "service error"; the source chain says what.
fn full<E: std::error::Error>(e: E) -> StoreError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    StoreError::Unavailable(msg)
}

impl S3Store {
    pub fn new(s: &S3Settings) -> S3Store {
        let creds = Credentials::new(&s.access_key_id, &s.secret_access_key, None, None, "confer");
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(Region::new(s.region.clone()))
            .credentials_provider(creds)
            .force_path_style(s.path_style)
            // Checksums only where S3 requires them: the SDK's default
            // (streamed CRC trailers) is refused by Garage and others.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(e) = &s.endpoint {
            b = b.endpoint_url(e);
        }
        S3Store {
            client: Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
        }
    }

    /// Installs (or confirms) the rule that deletes recordings `days` after
    /// they are written. Returns a description of what is in place.
    pub async fn ensure_lifecycle(&self, days: u32) -> Result<String, StoreError> {
        let rule = LifecycleRule::builder()
            .id("confer-recordings-expiry")
            .status(ExpirationStatus::Enabled)
            .filter(LifecycleRuleFilter::builder().prefix(PREFIX).build())
            .expiration(LifecycleExpiration::builder().days(days as i32).build())
            .build()
            .map_err(err)?;
        let config = BucketLifecycleConfiguration::builder()
            .rules(rule)
            .build()
            .map_err(err)?;
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(config)
            .send()
            .await
            .map_err(full)?;
        let got = self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(full)?;
        lifecycle_days(got.rules())
            .filter(|d| *d == days as i32)
            .map(|d| format!("objects under {PREFIX} expire after {d} days"))
            .ok_or_else(|| StoreError::Other("the lifecycle rule did not stick".into()))
    }

    /// The expiry (days) of our rule, as the bucket has it now.
    pub async fn lifecycle(&self) -> Result<Option<i32>, StoreError> {
        let got = self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(full)?;
        Ok(lifecycle_days(got.rules()))
    }
}

fn lifecycle_days(rules: &[LifecycleRule]) -> Option<i32> {
    rules
        .iter()
        .find(|r| {
            r.id() == Some("confer-recordings-expiry") && r.status() == &ExpirationStatus::Enabled
        })
        .and_then(|r| r.expiration())
        .and_then(|e| e.days())
}

#[async_trait::async_trait]
impl Store for S3Store {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, StoreError> {
        let size = tokio::fs::metadata(path).await.map_err(err)?.len();
        let body = ByteStream::from_path(path).await.map_err(err)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(if key.ends_with(".webm") {
                "video/webm"
            } else {
                "application/octet-stream"
            })
            .body(body)
            .send()
            .await
            .map_err(full)?;
        Ok(size)
    }

    async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(full)?;
        Ok(())
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(
                o.body.collect().await.map_err(err)?.into_bytes().to_vec(),
            )),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(full(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(full)?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(full)?;
        Ok(())
    }

    async fn download(&self, key: &str, filename: &str) -> Result<Download, StoreError> {
        let presigned = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .response_content_disposition(format!("inline; filename=\"{filename}\""))
            .presigned(PresigningConfig::expires_in(PRESIGN_FOR).map_err(err)?)
            .await
            .map_err(full)?;
        Ok(Download::Url(presigned.uri().to_string()))
    }
}
