//! A node agent's calls to another node's agent: pulling the source of a
//! copy. The same channel as the controller's (TLS rooted in the agent
//! token, then the token), with a leaf of the peer's role
//! ([`crate::tls::Role::Peer`]), on a connection of its own per copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Endpoint;

use crate::api::copies_client::CopiesClient;
use crate::api::{ExportFrame, ExportRequest};
use crate::auth::{SendToken, Token};
use crate::error::{Error, Result};
use crate::tls::Connector;

/// How long connecting to another agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls to other agents.
#[derive(Debug, Clone)]
pub struct Peers {
    token: SendToken,
    tls: Connector,
}

impl Peers {
    /// Calls with `token` over `tls` ([`crate::tls::client_config`] for
    /// [`crate::tls::Role::Peer`]).
    pub fn new(token: &Token, tls: Arc<rustls::ClientConfig>) -> Peers {
        Peers { token: SendToken::new(token), tls: Connector::new(tls) }
    }

    /// Starts the export of `request`'s source from the agent of `node` at
    /// `addr`. Not reaching it is ABORTED, so the CO retries the
    /// CreateVolume that needs it.
    pub async fn export(
        &self,
        node: &str,
        addr: SocketAddr,
        request: ExportRequest,
    ) -> Result<tonic::Streaming<ExportFrame>> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::Aborted(format!(
                "cannot reach the agent of node {node} at {addr}, which holds the source to copy: {e}; the retry \
                 tries again"
            ))
        };
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::InvalidArgument(format!("source agent address {addr}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(self.tls.clone())
            .await
            .map_err(|e| unreachable(&chain(&e)))?;
        let mut client = CopiesClient::with_interceptor(channel, self.token.clone());
        match client.export(request).await {
            Ok(stream) => Ok(stream.into_inner()),
            // The source agent's own answer (NOT_FOUND, FAILED_PRECONDITION...)
            // is the answer.
            Err(status) if !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
                Err(Error::Forwarded { status })
            }
            Err(status) => Err(unreachable(&status.message())),
        }
    }
}

/// An error with its causes, as one line: a transport error alone says
/// only "transport error".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
