//! Reaching the plugin: a lazily connecting channel, each
//! RPC under the per-call timeout, and a failed RPC as a `<GRPC_CODE>: <message>` error.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use loam::endpoint::Endpoint;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Uri};
use tonic::{Code, Response, Status};

/// Builds a lazily connecting channel, so that connection failures surface as statuses.
pub(super) fn connect(target: Endpoint, timeout: Duration) -> Result<Channel> {
    Ok(match target {
        Endpoint::Unix(path) => tonic::transport::Endpoint::try_from("http://[::]:50051")?
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
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(timeout).connect_lazy()
        }
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
