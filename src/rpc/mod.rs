//! The CSI gRPC surface: one module per service, each thin.
//!
//! A handler validates its request ([`validate`]), claims the volume or
//! snapshot it touches, and runs the [`crate::driver::Driver`] method on a
//! blocking thread with the claim moved along, so a cancelled call can never
//! release its claim while its work still runs. `traced` wraps every
//! handler in a span (`traced`) carrying the method, the object id, the outcome and the
//! duration.

pub mod controller;
pub mod copies;
pub mod group;
pub mod group_parts;
pub mod identity;
pub mod node;
pub mod routed;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

use crate::driver::Driver;
use crate::error::{Error, Result};

/// Runs one RPC inside a span and logs its outcome and duration, also when
/// the caller gave up before the answer (the future is then dropped).
pub(crate) async fn traced<T>(
    method: &'static str,
    id: &str,
    handler: impl Future<Output = Result<T>>,
) -> std::result::Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", method, id);
    let mut call = Call { method, span: span.clone(), started: Instant::now(), finished: false };
    let outcome = handler.instrument(span).await;
    call.finished = true;
    let code = outcome.as_ref().map_or_else(Error::code, |_| tonic::Code::Ok);
    crate::metrics::global().rpc(method, code, call.started.elapsed());
    crate::memory::call_finished();
    let micros = call.micros();
    call.span.in_scope(|| match &outcome {
        Ok(_) => tracing::info!(micros, "ok"),
        Err(e) => tracing::warn!(micros, code = ?e.code(), error = %e, "failed"),
    });
    outcome.map(Response::new).map_err(Status::from)
}

/// One traced call; dropped unfinished means the caller cancelled it (a
/// deadline or a closed connection), which is logged: work already handed
/// to a blocking thread still runs to its end and keeps its claim.
struct Call {
    method: &'static str,
    span: tracing::Span,
    started: Instant,
    finished: bool,
}

impl Call {
    fn micros(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            crate::metrics::global().rpc(self.method, tonic::Code::Cancelled, self.started.elapsed());
            crate::memory::call_finished();
            let micros = self.micros();
            self.span.in_scope(|| tracing::warn!(micros, outcome = "cancelled", "cancelled by the caller"));
        }
    }
}

/// Runs driver work on a blocking thread holding `claim` (the guards of the
/// objects it changes), moved along with the work: a caller who gives up
/// never releases the claim while the work still runs.
pub(crate) async fn claimed<C, T>(
    claim: C,
    driver: &Arc<Driver>,
    work: impl FnOnce(&Driver) -> Result<T> + Send + 'static,
) -> Result<T>
where
    C: Send + 'static,
    T: Send + 'static,
{
    let driver = driver.clone();
    blocking(move || {
        let _claim = claim;
        work(&driver)
    })
    .await
}

/// A record's creation time as CSI carries it.
pub(crate) fn timestamp(seconds: i64, nanos: i32) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

/// Runs blocking driver work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::io("driver task failed", std::io::Error::other(e.to_string())))?
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written by the subscriber, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(run: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, run);
        String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8 log")
    }

    #[test]
    fn a_call_the_caller_abandons_is_logged_as_cancelled() {
        let log = logged(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
            runtime.block_on(async {
                let never = traced("CreateVolume", "pvc-1", std::future::pending::<Result<()>>());
                let abandoned = tokio::time::timeout(std::time::Duration::from_millis(10), never).await;
                assert!(abandoned.is_err(), "the handler never finishes");
            });
        });
        assert!(
            log.contains("cancelled by the caller") && log.contains("CreateVolume") && log.contains("pvc-1"),
            "{log}"
        );
    }

    #[test]
    fn a_finished_call_logs_its_outcome_once() {
        let log = logged(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let failed =
                runtime.block_on(traced("DeleteVolume", "v", async { Err::<(), _>(Error::NotFound("v".into())) }));
            assert_eq!(failed.expect_err("failed").code(), tonic::Code::NotFound);
        });
        assert!(log.contains("failed") && !log.contains("cancelled"), "{log}");
    }
}
