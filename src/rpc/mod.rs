//! The CSI gRPC surface: one module per service, each thin.
//!
//! A handler validates its request ([`validate`]), claims the volume or
//! snapshot it touches, and runs the [`crate::driver::Driver`] method on a
//! blocking thread with the claim moved along, so a cancelled call can never
//! release its claim while its work still runs. `traced` wraps every
//! handler in a span (`traced`) carrying the method, the object id, the outcome and the
//! duration.

pub mod controller;
pub mod group;
pub mod identity;
pub mod node;
pub mod routed;
pub mod validate;

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

use crate::error::{Error, Result};

/// Runs one RPC inside a span and logs its outcome and duration.
pub(crate) async fn traced<T>(
    method: &'static str,
    id: &str,
    handler: impl Future<Output = Result<T>>,
) -> std::result::Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", method, id);
    let started = Instant::now();
    let outcome = handler.instrument(span.clone()).await;
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    span.in_scope(|| match &outcome {
        Ok(_) => tracing::info!(micros, "ok"),
        Err(e) => tracing::warn!(micros, code = ?e.code(), error = %e, "failed"),
    });
    outcome.map(Response::new).map_err(Status::from)
}

/// Runs blocking driver work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::io("driver task failed", std::io::Error::other(e.to_string())))?
}
