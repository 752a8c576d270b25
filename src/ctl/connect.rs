//! Reaching the plugin: the `--endpoint` forms, a lazily connecting channel, each
//! RPC under the per-call timeout, and a failed RPC as a `<GRPC_CODE>: <message>` error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Response, Status};

/// Where the plugin listens.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    Unix(PathBuf),
    Http(String),
}

/// Parses the accepted `--endpoint` forms.
pub(super) fn parse_endpoint(s: &str) -> Result<Target> {
    let unix = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:"));
    if let Some(path) = unix.or_else(|| s.starts_with('/').then_some(s)) {
        if !path.starts_with('/') {
            bail!("invalid endpoint {s:?}: the socket path must be absolute");
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    match s.strip_prefix("tcp://").or_else(|| s.strip_prefix("http://")) {
        Some(addr) if !addr.is_empty() => Ok(Target::Http(format!("http://{addr}"))),
        _ => bail!("invalid endpoint {s:?}: expected unix:///path, /path or tcp://host:port"),
    }
}

/// Builds a lazily connecting channel, so that connection failures surface as statuses.
pub(super) fn connect(target: Target, timeout: Duration) -> Result<Channel> {
    Ok(match target {
        Target::Unix(path) => Endpoint::try_from("http://[::]:50051")?
            .connect_timeout(timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = UnixStream::connect(&path)
                        .await
                        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        Target::Http(uri) => Endpoint::from_shared(uri)?.connect_timeout(timeout).connect_lazy(),
    })
}

/// The canonical gRPC name of a status code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Turns a status into `CODE: message`, adding the root cause of a transport failure.
fn status_error(status: &Status) -> anyhow::Error {
    let mut message = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(inner) = cause.and_then(|c| c.source()) {
        cause = Some(inner);
    }
    if let Some(root) = cause.map(ToString::to_string)
        && !message.contains(&root)
    {
        message = format!("{message}: {root}");
    }
    anyhow!("{}: {message}", code_name(status.code()))
}

/// A connection to the plugin.
pub(super) struct Ctl {
    pub(super) channel: Channel,
    pub(super) timeout: Duration,
}

impl Ctl {
    /// Awaits one RPC under the per-call timeout.
    pub(super) async fn call<T>(&self, rpc: impl Future<Output = Result<Response<T>, Status>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, rpc).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status_error(&status)),
            Err(_) => bail!("DEADLINE_EXCEEDED: no response within {:?}", self.timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let unix = |p: &str| Some(Target::Unix(PathBuf::from(p)));
        assert_eq!(parse_endpoint("unix:///var/lib/loam/csi.sock").ok(), unix("/var/lib/loam/csi.sock"));
        assert_eq!(parse_endpoint("unix:/tmp/csi.sock").ok(), unix("/tmp/csi.sock"));
        assert_eq!(parse_endpoint("/tmp/csi.sock").ok(), unix("/tmp/csi.sock"));
        let http = |s: &str| Some(Target::Http(s.to_owned()));
        assert_eq!(parse_endpoint("tcp://127.0.0.1:10000").ok(), http("http://127.0.0.1:10000"));
        assert_eq!(parse_endpoint("http://localhost:9000").ok(), http("http://localhost:9000"));
        for bad in ["unix://relative.sock", "unix:relative", "csi.sock", "tcp://", "https://x:1", ""] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
