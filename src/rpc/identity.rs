//! The CSI Identity service: who Loam is and whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::{self, identity_server::Identity};
use crate::driver::Driver;
use crate::rpc::{blocking, traced};

/// Identity over a node's driver.
#[derive(Debug, Clone)]
pub struct IdentityService {
    driver: Arc<Driver>,
}

impl IdentityService {
    /// Serves Identity for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver }
    }
}

fn service_capability(kind: service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: kind as i32 })),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let config = self.driver.config();
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: config.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: [("node".to_owned(), config.node_id.clone())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let expansion = csi::PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service_capability(service::Type::ControllerService),
                service_capability(service::Type::VolumeAccessibilityConstraints),
                expansion,
            ],
        }))
    }

    async fn probe(&self, _: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        let driver = self.driver.clone();
        traced("Probe", "", async move {
            blocking(move || driver.ready()).await?;
            Ok(csi::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
