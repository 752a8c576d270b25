//! Heap given back to the kernel once a burst of calls is over.
//!
//! glibc keeps what a burst of calls freed (a listing of thousands of
//! volumes, sixteen creates at once) in its arenas for the next burst, so a
//! node agent's resident memory would stay at its busiest for good.
//! `malloc_trim(0)` hands every free page of every arena back (not only the
//! top of the heap); it costs a walk over the free chunks, so it runs once
//! per burst, a beat after the last call of it, and never while calls keep
//! coming.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Calls finished since start-up, cancelled ones included.
static CALLS_FINISHED: AtomicU64 = AtomicU64::new(0);

/// How long the node must be quiet before the heap is trimmed.
pub const QUIET: Duration = Duration::from_millis(500);

/// Counts a finished call ([`crate::rpc`] does, for every RPC).
pub fn call_finished() {
    CALLS_FINISHED.fetch_add(1, Ordering::Relaxed);
}

/// Trims the heap once after start-up (which parsed every record) and then
/// once after each burst: when calls finished during one [`QUIET`] period
/// and none during the next. Runs for as long as the process.
pub async fn give_back_after_bursts() {
    let mut tick = tokio::time::interval(QUIET);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = CALLS_FINISHED.load(Ordering::Relaxed);
    let mut freed_since = true;
    loop {
        tick.tick().await;
        let now = CALLS_FINISHED.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            freed_since = true;
        } else if std::mem::take(&mut freed_since) {
            // SAFETY: malloc_trim only walks and releases the allocator's
            // own free lists, under its own locks.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    }
}
