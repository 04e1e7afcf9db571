//! One short, useful line from an AWS SDK error.

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

/// The service's error code and message when the service answered (`ResourceNotFoundException:
/// Stream s not found`), else the chain of causes (a timeout, a refused connection…). Never the
/// raw HTTP response, which the SDK's `Display` of the whole error would include.
pub fn message<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            match (err.code(), err.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                _ => aws_smithy_types::error::display::DisplayErrorContext(err).to_string(),
            }
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let line = cause.to_string();
                if !text.contains(&line) {
                    text.push_str(": ");
                    text.push_str(&line);
                }
                source = cause.source();
            }
            text
        }
    }
}
