//! The real side of the [`Kernel`] seam: each method hands over to the
//! module that talks to the kernel (mount, mountinfo, mountpoint, loopdev,
//! blockfs, quota), whose privileged tests show what only the real kernel can.

use std::io;
use std::path::Path;

use super::blockfs::{self, Content, FsType};
use super::loopdev::{self, AttachOptions, LoopDevice};
use super::mkfs_options::MkfsOptions;
use super::mount::{self, MountFlags};
use super::mountinfo::{self, MountEntry};
use super::mountpoint;
use super::quota::{Btrfs, Enforcer, Project, ProjectQuota, btrfs};
use super::seam::Kernel;

/// This host's kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostKernel;

impl Kernel for HostKernel {
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> io::Result<()> {
        mount::bind(source, target, flags)
    }

    fn unmount(&self, target: &Path) -> io::Result<bool> {
        mount::unmount(target)
    }

    fn mounts(&self) -> io::Result<Vec<MountEntry>> {
        mountinfo::read()
    }

    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        mountpoint::is_mount_point(path)
    }

    fn mount_at(&self, path: &Path) -> io::Result<Option<MountEntry>> {
        mountpoint::mount_at(path)
    }

    fn mount_filesystem(&self, device: &Path, target: &Path, fs: FsType, flags: MountFlags) -> io::Result<()> {
        blockfs::mount(device, target, fs, flags)
    }

    fn attach(&self, image: &Path, options: AttachOptions) -> io::Result<LoopDevice> {
        loopdev::attach(image, options)
    }

    fn loop_devices(&self) -> io::Result<Vec<LoopDevice>> {
        loopdev::list()
    }

    fn find_loop_devices(&self, image: &Path) -> io::Result<Vec<LoopDevice>> {
        loopdev::find(image)
    }

    fn detach(&self, device: &Path) -> io::Result<()> {
        loopdev::detach(device)
    }

    fn refresh_capacity(&self, device: &Path) -> io::Result<()> {
        loopdev::refresh_capacity(device)
    }

    fn device_size(&self, device: &Path) -> io::Result<u64> {
        loopdev::device_size(device)
    }

    fn sector_size_for(&self, image: &Path) -> io::Result<u32> {
        loopdev::block_size_for(image)
    }

    fn probe(&self, device: &Path) -> io::Result<Content> {
        blockfs::probe(device)
    }

    fn mkfs(&self, device: &Path, fs: FsType, thick: bool, options: &MkfsOptions) -> io::Result<()> {
        blockfs::mkfs(device, fs, thick, options)
    }

    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> io::Result<()> {
        blockfs::grow(fs, device, mount_point)
    }

    fn grow_ext4_offline(&self, device: &Path, intent: &Path) -> io::Result<()> {
        blockfs::grow_ext4_offline(device, intent)
    }

    fn ext_size(&self, device: &Path) -> io::Result<Option<u64>> {
        blockfs::ext_size(device)
    }

    fn can_grow_online(&self, fs: FsType) -> io::Result<bool> {
        blockfs::can_grow_online(fs)
    }

    fn freeze(&self, mount_point: &Path) -> io::Result<()> {
        blockfs::freeze(mount_point)
    }

    fn thaw(&self, mount_point: &Path) -> io::Result<bool> {
        blockfs::thaw(mount_point)
    }

    fn quota_enforcer(&self, root: &Path, enable_btrfs_quota: bool) -> io::Result<Enforcer> {
        Enforcer::detect(root, enable_btrfs_quota)
    }

    fn is_subvolume(&self, path: &Path) -> bool {
        btrfs::is_subvolume(path)
    }

    fn create_subvolume(&self, path: &Path) -> io::Result<()> {
        btrfs::create_subvolume(path)
    }

    fn snapshot_subvolume(&self, source: &Path, path: &Path, read_only: bool) -> io::Result<()> {
        btrfs::snapshot(source, path, read_only)
    }

    fn delete_subvolume(&self, path: &Path) -> io::Result<()> {
        btrfs::delete_subvolume(path)
    }

    fn subvolume_id(&self, path: &Path) -> io::Result<u64> {
        btrfs::subvolume_id(path)
    }

    fn set_qgroup_limit(&self, path: &Path, id: u64, bytes: u64) -> io::Result<()> {
        enforcing_btrfs(path)?.set_limit(path, id, bytes)
    }

    fn qgroup_usage(&self, root: &Path, id: u64) -> io::Result<(u64, Option<u64>)> {
        enforcing_btrfs(root)?.usage(id)
    }

    fn assign_project(&self, dir: &Path, id: u32) -> io::Result<()> {
        // The directory is on the root's filesystem: any fd on it names it.
        Project::at(dir)?.assign(dir, id)
    }

    fn tagged_project(&self, dir: &Path) -> io::Result<u32> {
        Project::tagged(dir)
    }

    fn set_project_limit(&self, root: &Path, id: u32, bytes: u64, inodes: u64) -> io::Result<()> {
        Project::at(root)?.set_limit(id, bytes, inodes)
    }

    fn project_quota(&self, root: &Path, id: u32) -> io::Result<ProjectQuota> {
        Project::at(root)?.get(id)
    }
}

/// The btrfs filesystem holding `path`, whose quotas must be on (they were
/// when the root was opened; turning them off later is an operator's act).
fn enforcing_btrfs(path: &Path) -> io::Result<Btrfs> {
    match Btrfs::probe(path, false)? {
        btrfs::Probe::Enforcing(found) => Ok(found),
        btrfs::Probe::QuotaDisabled => Err(io::Error::other(format!(
            "btrfs quotas were turned off on the filesystem of {}; run `btrfs quota enable` on it and restart Loam",
            path.display()
        ))),
    }
}
