//! CSI clients over a Unix socket, for any driver.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use loam::csi::controller_client::ControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The three CSI services of one driver, sharing one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Identity service.
    pub identity: IdentityClient<Channel>,
    /// Controller service.
    pub controller: ControllerClient<Channel>,
    /// Node service.
    pub node: NodeClient<Channel>,
}

/// Connects to the driver listening on `socket`.
pub async fn connect(socket: &Path) -> anyhow::Result<Clients> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(Clients {
        identity: IdentityClient::new(channel.clone()),
        // A driver may answer a listing of every volume in one response,
        // larger than tonic's default 4 MiB limit: the bench reads it whole.
        controller: ControllerClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
        node: NodeClient::new(channel),
    })
}

/// A request with the bench's per-call deadline.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(120));
    request
}
