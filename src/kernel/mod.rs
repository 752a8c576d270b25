//! Narrow seams over the kernel: mounts, mount table, tree copies, usage.

pub mod copy;
pub mod mount;
pub mod mountinfo;
pub mod usage;

pub mod blockfs;
pub mod loopdev;
