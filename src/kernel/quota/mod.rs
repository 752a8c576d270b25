//! Capacity enforcement for directory volumes, chosen by what the root's
//! filesystem can do: btrfs qgroups, XFS/ext4 project quotas, or nothing
//! (with the reason). The set is closed, so an enum; each arm talks to the
//! kernel directly (ioctls, `quotactl_fd`, sysfs), never through tools.

pub mod btrfs;
pub mod project;

use std::io;
use std::path::Path;

use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, statfs};

pub use btrfs::Btrfs;
pub use project::{Project, ProjectIds, ProjectQuota};

use super::mountinfo::{self, MountEntry};

/// How a root's filesystem enforces volume capacities. The limits and
/// counters themselves are reached through the [`Kernel`](super::Kernel)
/// seam; what is held here is Loam's own bookkeeping.
#[derive(Debug)]
pub enum Enforcer {
    /// Each volume is a subvolume with a qgroup limit.
    Btrfs,
    /// Each volume directory has its own project id with a hard limit; the
    /// ids Loam's volumes hold.
    Project(ProjectIds),
    /// Capacities are not enforced; why, and how to fix it.
    None(String),
}

/// What a quota has counted for one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Bytes charged to the volume.
    pub bytes: u64,
    /// Inodes charged to the volume, where the quota counts them.
    pub inodes: Option<u64>,
    /// The byte limit in force, if any.
    pub limit: Option<u64>,
}

impl Enforcer {
    /// Finds out what the filesystem holding `root` can enforce. btrfs quotas
    /// are turned on only when `enable_btrfs_quota` says the operator wants it.
    pub fn detect(root: &Path, enable_btrfs_quota: bool) -> io::Result<Enforcer> {
        let kind = statfs(root)?.filesystem_type();
        if kind == BTRFS_SUPER_MAGIC {
            return Ok(match Btrfs::probe(root, enable_btrfs_quota)? {
                btrfs::Probe::Enforcing(_) => Enforcer::Btrfs,
                btrfs::Probe::QuotaDisabled => Enforcer::None(format!(
                    "{} is on btrfs without quotas; run `btrfs quota enable {}` or start Loam with --quota required, \
                     which enables them",
                    root.display(),
                    root.display()
                )),
            });
        }
        let name = if kind == XFS_SUPER_MAGIC {
            "xfs"
        } else if kind == EXT4_SUPER_MAGIC {
            "ext4"
        } else {
            return Ok(Enforcer::None(format!(
                "{} is on a filesystem without per-directory quotas (type {:#x}); use btrfs, XFS with prjquota or \
                 ext4 with the project feature and prjquota",
                root.display(),
                kind.0
            )));
        };
        let mounts = mountinfo::read()?;
        let options = containing_mount(&mounts, root).map(|m| m.super_options.as_str()).unwrap_or_default();
        if !enforces_project_quota(name, options) {
            let fix = if name == "xfs" {
                "mount it with -o prjquota"
            } else {
                "run `tune2fs -O project,quota` on it (unmounted) and mount it with -o prjquota"
            };
            return Ok(Enforcer::None(format!(
                "{} is on {name} without enforced project quotas (options {options}); {fix}",
                root.display()
            )));
        }
        match Project::open(root) {
            Ok(_) => Ok(Enforcer::Project(ProjectIds::default())),
            Err(e) => Ok(Enforcer::None(format!(
                "{} is on {name} with prjquota but quotactl_fd fails ({e}); Linux 5.14 or later is needed",
                root.display()
            ))),
        }
    }

    /// A short name of the mechanism, for logs and volume context.
    pub fn describe(&self) -> String {
        match self {
            Enforcer::Btrfs => "btrfs qgroups".into(),
            Enforcer::Project(_) => "project quotas".into(),
            Enforcer::None(reason) => format!("not enforced: {reason}"),
        }
    }
}

/// Whether XFS or ext4 superblock options say project quotas are enforced:
/// XFS shows `prjquota` (or `pquota`) when enforcing and `pqnoenforce` when
/// only counting; ext4 shows `prjquota`.
fn enforces_project_quota(fs: &str, super_options: &str) -> bool {
    super_options.split(',').any(|o| o == "prjquota" || (fs == "xfs" && o == "pquota"))
}

/// The mount `path` lives on: the deepest mount point above it, the topmost
/// when several are stacked there (`max_by_key` keeps the last maximum).
fn containing_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().filter(|m| path.starts_with(&m.mount_point)).max_by_key(|m| m.mount_point.as_os_str().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_quota_enforcement_is_read_from_super_options() {
        assert!(enforces_project_quota("xfs", "rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota"));
        assert!(enforces_project_quota("xfs", "rw,pquota"));
        assert!(!enforces_project_quota("xfs", "rw,attr2,inode64,pqnoenforce"));
        assert!(enforces_project_quota("ext4", "rw,prjquota"));
        assert!(!enforces_project_quota("ext4", "rw,quota,usrquota"));
        assert!(!enforces_project_quota("ext4", "rw,pquota"));
    }

    #[test]
    fn the_deepest_topmost_mount_contains_a_path() {
        let mounts = mountinfo::parse(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 8:2 / /srv rw - xfs /dev/sdb rw,prjquota\n\
             3 1 8:3 / /srv rw - btrfs /dev/sdc rw\n\
             4 1 8:4 / /srvx rw - ext4 /dev/sdd rw\n",
        )
        .unwrap();
        assert_eq!(containing_mount(&mounts, Path::new("/srv/loam")).unwrap().mount_id, 3);
        assert_eq!(containing_mount(&mounts, Path::new("/var")).unwrap().mount_id, 1);
    }

    #[test]
    fn a_root_without_quota_support_says_why() {
        // The test suite's temporary directories are on tmpfs or an
        // unquota'd filesystem; either way detection must not fail.
        let dir = tempfile::tempdir().unwrap();
        match Enforcer::detect(dir.path(), false).unwrap() {
            Enforcer::None(reason) => assert!(reason.contains(&dir.path().display().to_string()), "{reason}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
