//! Narrow seams over the kernel: mounts, mount table, caller paths opened
//! without following symlinks, tree copies, usage, quotas.

pub mod copy;
pub mod mount;
pub mod mountinfo;
pub mod nofollow;
pub mod quota;
pub mod usage;

pub mod blockfs;
pub mod loopdev;
pub mod mkfs_options;
