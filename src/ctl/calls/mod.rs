//! What each subcommand does: the request it sends, and how the response becomes
//! its output (a JSON document and readable text). One function per
//! subcommand, grouped by CSI service; [`Ctl::execute`] only dispatches.

mod controller;
mod group;
mod identity;
mod node;
mod snapshots;

use anyhow::Result;
use loam::csi::controller_client::ControllerClient;
use loam::csi::group_controller_client::GroupControllerClient;
use loam::csi::identity_client::IdentityClient;
use loam::csi::node_client::NodeClient;
use tonic::transport::Channel;

use super::args::Cmd;
use super::connect::Ctl;
use super::output::Output;

impl Ctl {
    /// Runs one subcommand and returns what it prints.
    pub(super) async fn execute(&self, command: Cmd) -> Result<Output> {
        match command {
            Cmd::Info => identity::info(self).await,
            Cmd::Probe => identity::probe(self).await,
            Cmd::Capabilities => identity::capabilities(self).await,
            Cmd::CreateVolume(args) => args.run(self).await,
            Cmd::DeleteVolume(args) => args.run(self).await,
            Cmd::ListVolumes(page) => controller::list_volumes(self, page).await,
            Cmd::GetCapacity(args) => args.run(self).await,
            Cmd::ControllerPublish(args) => args.run(self).await,
            Cmd::ControllerUnpublish(args) => args.run(self).await,
            Cmd::Validate(args) => args.run(self).await,
            Cmd::ExpandVolume(args) => args.run(self).await,
            Cmd::ModifyVolume(args) => args.run(self).await,
            Cmd::GetVolume(args) => args.run(self).await,
            Cmd::CreateSnapshot(args) => args.run(self).await,
            Cmd::DeleteSnapshot(args) => args.run(self).await,
            Cmd::ListSnapshots(args) => args.run(self).await,
            Cmd::GetSnapshot(args) => args.run(self).await,
            Cmd::CreateGroupSnapshot(args) => args.run(self).await,
            Cmd::DeleteGroupSnapshot(args) => args.run(self).await,
            Cmd::GetGroupSnapshot(args) => args.run(self).await,
            Cmd::GroupCapabilities => group::group_capabilities(self).await,
            Cmd::NodeStage(args) => args.run(self).await,
            Cmd::NodeUnstage(args) => args.run(self).await,
            Cmd::NodePublish(args) => args.run(self).await,
            Cmd::NodeUnpublish(args) => args.run(self).await,
            Cmd::NodeInfo => node::node_info(self).await,
            Cmd::NodeStats(args) => args.run(self).await,
            Cmd::NodeExpand(args) => args.run(self).await,
        }
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    fn group(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel.clone())
    }
}
