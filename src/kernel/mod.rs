//! The kernel, behind one seam ([`Kernel`]): mounts and the mount table,
//! loop devices, filesystems on block devices, freezes and quotas, with a
//! real side ([`HostKernel`]) and a recording fake ([`FakeKernel`]). Below
//! the seam, one module per kind of kernel object; beside it, caller paths
//! opened without following symlinks, tree copies and usage.

pub mod copy;
pub mod fake;
pub mod host;
pub mod mount;
pub mod mountinfo;
pub mod mountpoint;
pub mod nofollow;
pub mod quota;
pub mod seam;
pub mod usage;

pub mod blockfs;
pub mod loopdev;
pub mod mkfs_options;

pub use fake::FakeKernel;
pub use host::HostKernel;
pub use seam::{Frozen, Kernel};
