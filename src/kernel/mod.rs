//! Narrow seams over the kernel: mounts, mount table, tree copies, usage,
//! quotas.

pub mod copy;
pub mod mount;
pub mod mountinfo;
pub mod quota;
pub mod usage;

pub mod blockfs;
pub mod loopdev;
pub mod mkfs_options;
