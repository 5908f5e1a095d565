//! Ctrl-C / SIGTERM in a foreground run: the first signal asks every lane to
//! stop (uploads in flight end and remove their temporary files, no new file
//! or step starts); the run then exits 130. Long-running loops poll
//! [`requested`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Has a stop been asked for?
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Ask every lane to stop (also what the signal handlers do).
pub fn request() {
    REQUESTED.store(true, Ordering::Relaxed);
}

/// Route SIGINT and SIGTERM to [`request`]. A second signal while stopping
/// ends the process at once (exit 130) — the temporary files of uploads
/// still in flight are then left for the next run to remove.
pub fn install_handlers() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // the second signal: terminate (the conditional default handler)
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
        // SAFETY: the action only stores to an atomic (async-signal-safe)
        unsafe { signal_hook::low_level::register(sig, request) }?;
    }
    Ok(())
}

/// Sleep for `d`, or less if a stop is asked for meanwhile.
pub fn sleep(d: std::time::Duration) {
    let until = std::time::Instant::now() + d;
    while !requested() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100))); // poll step
    }
}
