//! The one place AWS clients are built: region, credentials, endpoints, timeouts, retries.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};

/// Static credentials from the job's config. Debug output never shows the secret.
#[derive(Clone)]
pub struct StaticKeys {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeys")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// How to reach AWS (or an emulator) for one stream.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// The region; `None` takes the standard chain (`AWS_REGION`, profile…).
    pub region: Option<String>,
    /// Static keys; `None` takes the standard credentials chain.
    pub keys: Option<StaticKeys>,
    /// Kinesis endpoint override (local emulators, LocalStack); `AWS_ENDPOINT_URL_KINESIS` and
    /// `AWS_ENDPOINT_URL` also work, as in every AWS SDK.
    pub kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override.
    pub dynamodb_endpoint: Option<String>,
    /// Connection timeout.
    pub connect_timeout: Option<Duration>,
    /// Read (socket) timeout.
    pub read_timeout: Option<Duration>,
}

/// The clients one stream needs.
#[derive(Debug, Clone)]
pub struct AwsClients {
    /// Kinesis.
    pub kinesis: aws_sdk_kinesis::Client,
    /// DynamoDB (the lease table).
    pub dynamodb: aws_sdk_dynamodb::Client,
}

impl AwsClients {
    /// Builds the clients. Loads the shared config once (credential chain, region, env).
    pub async fn new(settings: &AwsSettings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config({
                let mut t = TimeoutConfig::builder();
                if let Some(c) = settings.connect_timeout {
                    t = t.connect_timeout(c);
                }
                if let Some(r) = settings.read_timeout {
                    t = t.read_timeout(r);
                }
                t.build()
            });
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(keys) = &settings.keys {
            loader = loader.credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                keys.access_key_id.clone(),
                keys.secret_access_key.clone(),
                None,
                None,
                "job.properties",
            ));
        }
        let shared = loader.load().await;
        let mut kinesis = aws_sdk_kinesis::config::Builder::from(&shared);
        if let Some(url) = &settings.kinesis_endpoint {
            kinesis = kinesis.endpoint_url(url);
        }
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&shared);
        if let Some(url) = &settings.dynamodb_endpoint {
            dynamodb = dynamodb.endpoint_url(url);
        }
        Self {
            kinesis: aws_sdk_kinesis::Client::from_conf(kinesis.build()),
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
        }
    }
}
