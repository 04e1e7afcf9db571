//! A leaner decode of the one hot call, `GetRecords`, inside the AWS SDK's own request.
//!
//! The SDK's JSON decoder scans strings byte by byte and copies each into a new `String`
//! (`shared/reference/decode-floor.md`: about half its `GetRecords` CPU), and decoding a full
//! answer costs far more than anything else the host does per record. Everything else about
//! the call stays the SDK's: endpoint, signing, retries, timeouts, error parsing and the other
//! fields of the output.
//!
//! [`LeanGetRecords`] is an interceptor added to one `GetRecords` call. On a successful
//! answer it wraps the response body; when the body has been read, the wrapper decodes its
//! `Records` with `serde_json` (strings borrowed from the body where they hold no escapes) and
//! `base64-simd` (the decoder the SDK itself uses for blobs) into the SDK's own [`Record`]s,
//! puts them in the call's [`DecodedRecords`], and hands the SDK the body without them:
//! `{"Records":[], …}` with every other field as received. Anything it does not decode
//! exactly as the SDK would (a timestamp as a string, an unknown shape, bad base64, a failed
//! read) is passed through untouched, and the SDK decodes the whole answer as before: the
//! reader then takes the SDK's records.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use aws_sdk_kinesis::primitives::{Blob, DateTime};
use aws_sdk_kinesis::types::{EncryptionType, Record};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The records one `GetRecords` call decoded here; empty when the SDK decoded them.
#[derive(Debug, Clone, Default)]
pub struct DecodedRecords(Arc<Mutex<Option<Vec<Record>>>>);

impl DecodedRecords {
    /// The records, if this module decoded the answer (taken: a second call gives `None`).
    pub fn take(&self) -> Option<Vec<Record>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn put(&self, records: Vec<Record>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(records);
    }
}

/// The interceptor; see the [module](self) documentation.
#[derive(Debug, Clone)]
pub struct LeanGetRecords {
    decoded: DecodedRecords,
}

impl LeanGetRecords {
    /// An interceptor for one call that leaves its records in `decoded`.
    pub fn new(decoded: DecodedRecords) -> Self {
        Self { decoded }
    }
}

impl Intercept for LeanGetRecords {
    fn name(&self) -> &'static str {
        "LeanGetRecords"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let response = context.response_mut();
        // A retried attempt must not leave the previous attempt's records behind.
        let _ = self.decoded.take();
        if !response.status().is_success() {
            return Ok(());
        }
        let inner = std::mem::replace(response.body_mut(), SdkBody::taken());
        *response.body_mut() = SdkBody::from_body_1_x(Trim {
            inner,
            buffer: BytesMut::new(),
            decoded: Some(self.decoded.clone()),
        });
        // The body the SDK reads is shorter than the one received.
        response.headers_mut().remove("content-length");
        Ok(())
    }
}

/// The response body as the SDK reads it: the received body without its records.
struct Trim {
    inner: SdkBody,
    buffer: BytesMut,
    /// `None` once the trimmed (or untouched) body was handed out.
    decoded: Option<DecodedRecords>,
}

impl http_body::Body for Trim {
    type Data = Bytes;
    type Error = aws_smithy_types::body::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        loop {
            let Some(decoded) = self.decoded.clone() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Poll::Ready(None) => {
                    self.decoded = None;
                    let received = std::mem::take(&mut self.buffer).freeze();
                    let body = match decode(&received) {
                        Some((records, trimmed)) => {
                            decoded.put(records);
                            Bytes::from(trimmed)
                        }
                        None => received,
                    };
                    return Poll::Ready(Some(Ok(http_body::Frame::data(body))));
                }
            }
        }
    }
}

/// A `GetRecords` answer as far as this module reads it.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<WireRecord<'a>>,
    #[serde(rename = "NextShardIterator", default, borrow)]
    next_shard_iterator: Option<&'a RawValue>,
    #[serde(rename = "MillisBehindLatest", default, borrow)]
    millis_behind_latest: Option<&'a RawValue>,
    #[serde(rename = "ChildShards", default, borrow)]
    child_shards: Option<&'a RawValue>,
}

/// One record on the wire.
#[derive(Deserialize)]
struct WireRecord<'a> {
    #[serde(rename = "SequenceNumber", borrow)]
    sequence_number: Cow<'a, str>,
    #[serde(rename = "ApproximateArrivalTimestamp", default, borrow)]
    approximate_arrival_timestamp: Option<&'a RawValue>,
    #[serde(rename = "Data", borrow)]
    data: Cow<'a, str>,
    #[serde(rename = "PartitionKey", borrow)]
    partition_key: Cow<'a, str>,
    #[serde(rename = "EncryptionType", default, borrow)]
    encryption_type: Option<Cow<'a, str>>,
}

/// The records of `body` and the body without them, or `None` when the SDK should decode it.
fn decode(body: &[u8]) -> Option<(Vec<Record>, Vec<u8>)> {
    let answer: Answer<'_> = serde_json::from_slice(body).ok()?;
    let mut records = Vec::with_capacity(answer.records.len());
    for wire in answer.records {
        let data = base64_simd::STANDARD.decode_to_vec(wire.data.as_bytes()).ok()?;
        let arrival = match wire.approximate_arrival_timestamp {
            Some(raw) if raw.get() != "null" => Some(epoch_seconds(raw.get())?),
            _ => None,
        };
        let record = Record::builder()
            .sequence_number(wire.sequence_number.into_owned())
            .set_approximate_arrival_timestamp(arrival)
            .data(Blob::new(data))
            .partition_key(wire.partition_key.into_owned())
            .set_encryption_type(wire.encryption_type.map(|e| EncryptionType::from(e.as_ref())))
            .build()
            .ok()?;
        records.push(record);
    }
    let mut trimmed = Vec::with_capacity(128);
    trimmed.extend_from_slice(b"{\"Records\":[]");
    for (name, value) in [
        ("NextShardIterator", answer.next_shard_iterator),
        ("MillisBehindLatest", answer.millis_behind_latest),
        ("ChildShards", answer.child_shards),
    ] {
        if let Some(value) = value {
            trimmed.extend_from_slice(format!(",\"{name}\":").as_bytes());
            trimmed.extend_from_slice(value.get().as_bytes());
        }
    }
    trimmed.push(b'}');
    Some((records, trimmed))
}

/// An epoch-seconds JSON number exactly as the SDK's decoder reads it; `None` for anything
/// else (the SDK then decodes the answer itself).
fn epoch_seconds(number: &str) -> Option<DateTime> {
    if !number.bytes().next().is_some_and(|b| b == b'-' || b.is_ascii_digit()) {
        return None;
    }
    if number.contains(['.', 'e', 'E']) {
        let f: f64 = number.parse().ok()?;
        (f.is_finite() && (i64::MIN as f64..i64::MAX as f64).contains(&f))
            .then(|| DateTime::from_secs_f64(f))
    } else {
        number.parse::<i64>().ok().map(DateTime::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;
    use crate::aws::{AwsClients, AwsSettings, StaticKeys};

    /// Answers every request on a loopback port with `bodies[i % len]`, then the next.
    fn serve(bodies: Vec<(u16, String)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("address").port();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut request = vec![0; length];
                let _ = reader.read_exact(&mut request);
                let (status, body) = &bodies[i % bodies.len()];
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    async fn client(endpoint: String) -> aws_sdk_kinesis::Client {
        let settings = AwsSettings {
            region: Some("us-east-1".into()),
            keys: Some(StaticKeys { access_key_id: "a".into(), secret_access_key: "b".into() }),
            kinesis_endpoint: Some(endpoint),
            ..AwsSettings::default()
        };
        AwsClients::new(&settings).await.kinesis
    }

    fn answers() -> Vec<String> {
        let b64 = |data: &[u8]| base64_simd::STANDARD.encode_to_string(data);
        let binary: Vec<u8> = (0..=255u8).cycle().take(1500).collect();
        vec![
            // Plain records, a null ChildShards, a decimal and an exponent timestamp.
            format!(
                r#"{{"Records":[{{"Data":"{}","PartitionKey":"pk-1","SequenceNumber":"49590338271490256608559692538361571095921575989136588898","ApproximateArrivalTimestamp":1.712345678123E9}},{{"SequenceNumber":"49590338271490256608559692538361571095921575989136588899","ApproximateArrivalTimestamp":1712345678.5,"Data":"{}","PartitionKey":"pk-2","EncryptionType":"KMS"}}],"NextShardIterator":"AAAA/bb+cc==","MillisBehindLatest":12,"ChildShards":null}}"#,
                b64(b"hello"),
                b64(&binary),
            ),
            // Escapes in every string, an integer timestamp, an empty payload, no timestamp.
            format!(
                r#"{{"MillisBehindLatest":0,"Records":[{{"Data":"{}","PartitionKey":"k\u00e9y \"q\" \\ \/","SequenceNumber":"1","ApproximateArrivalTimestamp":1712345678}},{{"Data":"","PartitionKey":"é","SequenceNumber":"2"}}],"NextShardIterator":"it"}}"#,
                b64(b"a/b?c>").replace('/', "\\/"),
            ),
            // Shard end: no iterator, child shards; and no records at all.
            r#"{"Records":[],"MillisBehindLatest":0,"ChildShards":[{"ShardId":"shardId-000000000002","ParentShards":["shardId-000000000000","shardId-000000000001"],"HashKeyRange":{"StartingHashKey":"0","EndingHashKey":"340282366920938463463374607431768211455"}}]}"#.to_owned(),
            // Not for this module (a timestamp as a string): passed through to the SDK.
            r#"{"Records":[{"Data":"eA==","PartitionKey":"p","SequenceNumber":"3","ApproximateArrivalTimestamp":"1712345678"}],"NextShardIterator":"it"}"#.to_owned(),
        ]
    }

    /// One `GetRecords` through the lean decoder, its records into `decoded`.
    async fn lean_get_records(
        client: &aws_sdk_kinesis::Client,
        decoded: &DecodedRecords,
    ) -> Result<
        aws_sdk_kinesis::operation::get_records::GetRecordsOutput,
        aws_sdk_kinesis::error::SdkError<aws_sdk_kinesis::operation::get_records::GetRecordsError>,
    > {
        client
            .get_records()
            .shard_iterator("x")
            .customize()
            .interceptor(LeanGetRecords::new(decoded.clone()))
            .send()
            .await
    }

    /// Every answer: the records and output fields are exactly the SDK's own.
    #[tokio::test(flavor = "multi_thread")]
    async fn yields_exactly_what_the_sdk_yields() {
        let answers = answers();
        // Each answer twice: once for the SDK alone, once with the interceptor.
        let endpoint =
            serve(answers.iter().flat_map(|b| [(200, b.clone()), (200, b.clone())]).collect());
        let client = client(endpoint).await;
        for (i, _) in answers.iter().enumerate() {
            let sdk = client.get_records().shard_iterator("x").send().await;
            let decoded = DecodedRecords::default();
            let lean = lean_get_records(&client, &decoded).await;
            let (sdk, lean) = match (sdk, lean) {
                (Ok(sdk), Ok(lean)) => (sdk, lean),
                (sdk, lean) => {
                    assert_eq!(sdk.is_ok(), lean.is_ok(), "answer {i}");
                    continue;
                }
            };
            let ours = decoded.take();
            if i == 3 {
                assert!(ours.is_none(), "answer {i} should be left to the SDK");
                assert_eq!(lean.records(), sdk.records());
            } else {
                assert_eq!(ours.as_deref(), Some(sdk.records()), "answer {i}");
                assert!(lean.records().is_empty());
            }
            assert_eq!(lean.next_shard_iterator(), sdk.next_shard_iterator(), "answer {i}");
            assert_eq!(lean.millis_behind_latest(), sdk.millis_behind_latest(), "answer {i}");
            assert_eq!(lean.child_shards(), sdk.child_shards(), "answer {i}");
        }
    }

    /// A failed call: the SDK's error, and no records.
    #[tokio::test(flavor = "multi_thread")]
    async fn errors_stay_the_sdks() {
        let endpoint = serve(vec![(
            400,
            r#"{"__type":"ExpiredIteratorException","message":"Iterator expired"}"#.to_owned(),
        )]);
        let client = client(endpoint).await;
        let decoded = DecodedRecords::default();
        let result = lean_get_records(&client, &decoded).await;
        let error = result.err().and_then(|e| e.into_service_error().into());
        assert!(error.is_some_and(
            |e: aws_sdk_kinesis::operation::get_records::GetRecordsError| {
                e.is_expired_iterator_exception()
            }
        ));
        assert!(decoded.take().is_none());
    }
}
