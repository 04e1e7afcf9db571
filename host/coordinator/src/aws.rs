//! The one place AWS clients are built: region, credentials, endpoints, timeouts, retries, proxy
//! and connection limit.

use std::num::NonZeroUsize;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_smithy_http_client::pool::{self, ConnectionPool};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

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

/// An HTTP proxy that Kinesis and DynamoDB requests go through, spoken to in plain HTTP (the AWS
/// SDK for Java's default `ProxyProtocol`): `http://` endpoints are asked of the proxy in absolute
/// form (`POST http://host:port/ HTTP/1.1`), `https://` ones through a `CONNECT` tunnel.
#[derive(Clone)]
pub struct HttpProxy {
    url: String,
    config: ProxyConfig,
}

impl HttpProxy {
    /// The proxy at `host` (a name, an IPv4 address or an IPv6 address, with or without
    /// brackets) and `port`.
    pub fn new(host: &str, port: u16) -> Result<Self, InvalidProxy> {
        let host = host.trim();
        let url = if host.contains(':') && !host.starts_with('[') {
            format!("http://[{host}]:{port}")
        } else {
            format!("http://{host}:{port}")
        };
        let invalid = |reason: String| InvalidProxy { url: url.clone(), reason };
        if host.is_empty() || host.contains(['/', '@', '?', '#']) {
            return Err(invalid("expected a host name or IP address".to_owned()));
        }
        // `all`: the proxy carries `https://` traffic too, as `ProxyHost` does in the Java SDK.
        let config = ProxyConfig::all(url.as_str()).map_err(|e| invalid(e.to_string()))?;
        Ok(Self { url, config })
    }

    /// `http://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HttpProxy").field(&self.url).finish()
    }
}

/// A proxy host that makes no valid proxy URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url} is not a valid HTTP proxy: {reason}")]
pub struct InvalidProxy {
    url: String,
    reason: String,
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
    /// The HTTP proxy every Kinesis and DynamoDB request goes through (`ProxyHost`/`ProxyPort`).
    /// It replaces the proxy environment variables for these clients; `NO_PROXY` does not apply
    /// to it. `None` keeps the SDK's default, which honours `HTTPS_PROXY`, `HTTP_PROXY`,
    /// `ALL_PROXY` and `NO_PROXY`. Credential providers (STS, SSO, instance and container
    /// metadata) never use it, as in the Java SDK, whose `ClientConfiguration` proxy covers only
    /// the service client it configures.
    pub proxy: Option<HttpProxy>,
    /// The most connections the Kinesis client, and separately the DynamoDB client, keeps to one
    /// endpoint (scheme, host and port) at once: connecting, busy and idle connections all count,
    /// and a request that finds none free waits for one (the wait counts towards
    /// [`read_timeout`](Self::read_timeout)). This is the SDK connection pool's
    /// `max_connections_per_host`, the nearest to the Java SDK's `MaxConnections` (the size of
    /// each client's pool, per route and in total): each client here reaches one endpoint, as in
    /// KCL. `None`: no limit, the SDK's default.
    pub max_connections: Option<NonZeroUsize>,
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
        // One pool per client, like the Java SDK's one pool per client: with both clients on
        // one endpoint (LocalStack), each still gets `max_connections`.
        if let Some(client) = http_client(settings) {
            kinesis = kinesis.http_client(client);
        }
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&shared);
        if let Some(url) = &settings.dynamodb_endpoint {
            dynamodb = dynamodb.endpoint_url(url);
        }
        if let Some(client) = http_client(settings) {
            dynamodb = dynamodb.http_client(client);
        }
        Self {
            kinesis: aws_sdk_kinesis::Client::from_conf(kinesis.build()),
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
        }
    }
}

/// The HTTP client for a Kinesis or DynamoDB client, or `None` for the SDK's default (kept exactly
/// when neither a proxy nor a connection limit is set).
///
/// The SDK's default client is hyper's legacy pool, whose only limit is on idle connections, so
/// the client built here (for a proxy alone too: one code path) is the SDK's own
/// [`ConnectionPool`], which bounds all connections per origin. Otherwise it is like the default
/// client: rustls with aws-lc, HTTP/2 or HTTP/1.1 by ALPN, a 90-second idle timeout, connect and
/// read timeouts from the SDK config, and the environment's proxy settings unless a proxy is
/// given.
fn http_client(settings: &AwsSettings) -> Option<pool::Client> {
    if settings.proxy.is_none() && settings.max_connections.is_none() {
        return None;
    }
    let proxy = settings.proxy.as_ref().map_or_else(ProxyConfig::from_env, |p| p.config.clone());
    let mut builder = ConnectionPool::builder().proxy_config(proxy);
    builder.set_max_connections_per_host(settings.max_connections.map(NonZeroUsize::get));
    // Neither can fail: the limit is not zero and the pool has no explicit partitions.
    let pool = builder
        .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
        .build_https()
        .expect("a connection pool with a non-zero limit and no partitions builds");
    Some(pool::Client::new(&pool).expect("a pool without explicit partitions has an anonymous one"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let url = |host: &str, port| HttpProxy::new(host, port).map(|p| p.url().to_owned());
        assert_eq!(url("proxy.example.com", 3128).as_deref(), Ok("http://proxy.example.com:3128"));
        assert_eq!(url(" 10.0.0.1 ", 80).as_deref(), Ok("http://10.0.0.1:80"));
        assert_eq!(url("::1", 8080).as_deref(), Ok("http://[::1]:8080"));
        assert_eq!(url("[::1]", 8080).as_deref(), Ok("http://[::1]:8080"));
        for bad in ["", "http://proxy", "user@proxy", "a b"] {
            assert!(url(bad, 1).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            format!("{:?}", HttpProxy::new("proxy", 3128).ok()),
            r#"Some(HttpProxy("http://proxy:3128"))"#
        );
    }

    /// `https://` endpoints go through the proxy too, in a `CONNECT` tunnel (the test of
    /// `kinesis-host run` covers `http://` endpoints).
    #[tokio::test(flavor = "multi_thread")]
    async fn https_requests_tunnel_through_the_proxy() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("non-blocking");
        let proxy = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return format!("no connection to the proxy: {e}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking");
            stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).expect("a request line");
            let _ = (&stream).write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
            line
        });
        let settings = AwsSettings {
            region: Some("us-east-1".into()),
            keys: Some(StaticKeys { access_key_id: "a".into(), secret_access_key: "b".into() }),
            kinesis_endpoint: Some("https://kinesis.us-east-1.amazonaws.com".into()),
            connect_timeout: Some(Duration::from_secs(5)),
            read_timeout: Some(Duration::from_secs(5)),
            proxy: HttpProxy::new("127.0.0.1", port).ok(),
            ..AwsSettings::default()
        };
        let clients = AwsClients::new(&settings).await;
        assert!(clients.kinesis.list_streams().send().await.is_err(), "the proxy refused");
        let line = proxy.join().expect("proxy thread");
        assert!(
            line.starts_with("CONNECT kinesis.us-east-1.amazonaws.com:443 "),
            "request line {line:?}"
        );
    }

    /// The TLS ClientHello that `client` sends for `SubscribeToShard` to a local listener.
    async fn client_hello(max_connections: Option<NonZeroUsize>) -> Vec<u8> {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("address").port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("a connection");
            stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let mut hello = vec![0; 4096];
            let n = stream.read(&mut hello).expect("a ClientHello");
            hello.truncate(n);
            hello
        });
        let settings = AwsSettings {
            region: Some("us-east-1".into()),
            keys: Some(StaticKeys { access_key_id: "a".into(), secret_access_key: "b".into() }),
            kinesis_endpoint: Some(format!("https://127.0.0.1:{port}")),
            connect_timeout: Some(Duration::from_secs(5)),
            read_timeout: Some(Duration::from_secs(5)),
            max_connections,
            ..AwsSettings::default()
        };
        let clients = AwsClients::new(&settings).await;
        let position = aws_sdk_kinesis::types::StartingPosition::builder()
            .r#type(aws_sdk_kinesis::types::ShardIteratorType::Latest)
            .build()
            .expect("a starting position");
        let sent = clients
            .kinesis
            .subscribe_to_shard()
            .consumer_arn("arn:aws:kinesis:us-east-1:1:stream/s/consumer/c:1")
            .shard_id("shardId-000000000000")
            .starting_position(position)
            .send()
            .await;
        assert!(sent.is_err(), "the listener speaks no TLS");
        server.join().expect("listener thread")
    }

    /// Kinesis serves `SubscribeToShard` over HTTP/2 only: both clients offer `h2` by ALPN in
    /// their TLS handshake (the SDK's default one, and the pool built for `MaxConnections` or a
    /// proxy). Plain `http://` endpoints (kinesis-local) get HTTP/1.1.
    #[tokio::test(flavor = "multi_thread")]
    async fn subscribe_to_shard_offers_http2_over_tls() {
        // The ALPN extension's protocol list: "h2", then "http/1.1".
        let alpn: &[u8] = b"\x02h2\x08http/1.1";
        for limit in [None, NonZeroUsize::new(4)] {
            let hello = client_hello(limit).await;
            assert_eq!(hello.first(), Some(&0x16), "a TLS handshake record: {hello:?}");
            assert!(
                hello.windows(alpn.len()).any(|w| w == alpn),
                "no h2 in the ALPN offer (MaxConnections {limit:?}): {hello:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_default_client_is_kept_unless_a_proxy_or_limit_is_set() {
        assert!(http_client(&AwsSettings::default()).is_none());
        let proxy = HttpProxy::new("127.0.0.1", 3128).ok();
        assert!(http_client(&AwsSettings { proxy, ..AwsSettings::default() }).is_some());
        let max_connections = NonZeroUsize::new(5);
        assert!(http_client(&AwsSettings { max_connections, ..AwsSettings::default() }).is_some());
    }
}
