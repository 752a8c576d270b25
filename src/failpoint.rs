//! Fault points for the crash harness (`tests/crash.rs`): places inside an
//! operation where the harness kills the driver as `kill -9` would, at the
//! irreversible steps a timed kill cannot reliably hit (between a mount and
//! the record that says so, between freeze and thaw, around mkfs).
//!
//! Compiled in only with the `failpoints` cargo feature; without it
//! [`failpoint!`](crate::failpoint!) expands to nothing. With it,
//! `LOAM_FAILPOINT=name` kills the process the first time it reaches
//! `failpoint!("name")`, `name@N` the N-th time, and a `+group` suffix
//! (`name@2+group`) kills its whole process group, so a running mkfs dies
//! with it as a container's children do.

/// Marks a fault point; see the module. Nothing without the `failpoints` feature.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::reach($name);
    };
}

/// Kills this process (or its group) here if `LOAM_FAILPOINT` names `name`
/// and this is the hit it counts to.
#[cfg(feature = "failpoints")]
pub fn reach(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The armed point: its name, the hit that fires, whether the group dies.
    struct Armed {
        name: String,
        hit: u32,
        group: bool,
        seen: AtomicU32,
    }
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("LOAM_FAILPOINT").ok()?;
        let (spec, group) = match spec.strip_suffix("+group") {
            Some(rest) => (rest.to_owned(), true),
            None => (spec, false),
        };
        let (name, hit) = match spec.split_once('@') {
            Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some(Armed { name, hit, group, seen: AtomicU32::new(0) })
    });
    let Some(armed) = armed else { return };
    if armed.name != name || armed.seen.fetch_add(1, Ordering::SeqCst) + 1 != armed.hit {
        return;
    }
    eprintln!("failpoint {name}: killing the driver{}", if armed.group { " and its process group" } else { "" });
    // pid 0 is the caller's process group.
    let target = if armed.group { 0 } else { nix::unistd::getpid().as_raw() };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(target, libc::SIGKILL) };
    // Other threads may run on for a moment while the kernel tears the
    // process down; this one takes no further step.
    loop {
        std::thread::park();
    }
}
