//! The CSI Identity service: who Loam is and whether it is ready.
//!
//! Every mode serves Identity. Probe asks whether this process can do its
//! job: a process with a driver needs its root to answer; the routing
//! controller is ready as soon as it serves, because a liveness probe that
//! failed while some agent is down would only restart a controller that has
//! nothing to fix (each routed call reports its own unreachable agent).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::{self, identity_server::Identity};
use crate::driver::Driver;
use crate::rpc::{blocking, traced};

/// Identity for a node's driver or for the routing controller.
#[derive(Debug, Clone)]
pub struct IdentityService {
    driver_name: String,
    /// The driver behind this process; `None` for the routing controller.
    driver: Option<Arc<Driver>>,
}

impl IdentityService {
    /// Serves Identity for `driver`; Probe checks its root.
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver_name: driver.config().driver_name.clone(), driver: Some(driver) }
    }

    /// Serves Identity for the routing controller, which has no driver.
    pub fn router(driver_name: String) -> Self {
        IdentityService { driver_name, driver: None }
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
        // The node id tells the controller which node an agent serves.
        let manifest = self.driver.iter().map(|d| ("node".to_owned(), d.config().node_id.clone())).collect();
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: crate::config::VENDOR_VERSION.to_owned(),
            manifest,
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
        // The plugin's capabilities, the same in every mode: a node agent's
        // socket names the Controller services too, as the plugin serves them
        // (csi-sanity in the split layout reads them there).
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service_capability(service::Type::ControllerService),
                service_capability(service::Type::GroupControllerService),
                service_capability(service::Type::VolumeAccessibilityConstraints),
                expansion,
            ],
        }))
    }

    async fn probe(&self, _: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        let driver = self.driver.clone();
        traced("Probe", "", async move {
            if let Some(driver) = driver {
                blocking(move || driver.ready()).await?;
            }
            Ok(csi::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
