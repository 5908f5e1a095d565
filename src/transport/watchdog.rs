//! A deadline for blocking network calls: a thread that shuts a session's
//! sockets down when no progress was made in time. libssh2 and suppaftp both
//! wait their socket timeouts out again in every clean-up step; closing the
//! socket makes every pending and later call fail at once, so a stalled
//! transfer fails at its deadline, not at a multiple of it.

use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct WdState {
    deadline: Option<Instant>,
    stop: bool,
    fired: bool,
    control: Option<TcpStream>,
    data: Option<TcpStream>,
}

/// Shuts the session's sockets down when its deadline passes. `kick` pushes
/// the deadline on; `disarm` stops the clock. The data socket is watched only
/// while a transfer runs: a clone of it kept open would keep the connection
/// open after suppaftp closes it, and the server would wait for the end of
/// the file forever.
pub struct Watchdog {
    shared: Arc<(Mutex<WdState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub fn new(control: TcpStream, name: String) -> Watchdog {
        let shared = Arc::new((
            Mutex::new(WdState {
                control: Some(control),
                ..WdState::default()
            }),
            Condvar::new(),
        ));
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("watchdog {name}"))
            .spawn(move || {
                let (lock, cv) = &*s2;
                let Ok(mut st) = lock.lock() else { return };
                loop {
                    if st.stop {
                        return;
                    }
                    match st.deadline {
                        None => match cv.wait(st) {
                            Ok(g) => st = g,
                            Err(_) => return,
                        },
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                log::debug!("{name}: no progress before the deadline, closing the connection");
                                Self::shut(&mut st);
                                continue;
                            }
                            match cv.wait_timeout(st, d - now) {
                                Ok((g, _)) => st = g,
                                Err(_) => return,
                            }
                        }
                    }
                }
            })
            .ok();
        Watchdog { shared, thread }
    }

    fn shut(st: &mut WdState) {
        st.fired = true;
        st.deadline = None;
        for s in st.control.iter().chain(st.data.iter()) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut WdState) -> R) -> Option<R> {
        self.shared.0.lock().ok().map(|mut g| f(&mut g))
    }

    /// (Re)arm: fire `d` from now.
    pub fn kick(&self, d: Duration) {
        let was_idle = self
            .with(|s| {
                let idle = s.deadline.is_none();
                if !s.fired {
                    s.deadline = Some(Instant::now() + d);
                }
                idle
            })
            .unwrap_or(false);
        if was_idle {
            self.shared.1.notify_all();
        }
    }

    pub fn disarm(&self) {
        self.with(|s| s.deadline = None);
    }

    /// Kill the session now (a socket timed out: it cannot be trusted again).
    pub fn fire(&self) {
        self.with(Self::shut);
    }

    pub fn fired(&self) -> bool {
        self.with(|s| s.fired).unwrap_or(true)
    }

    /// Watch this data socket too (`None`: stop watching, and close our clone).
    pub fn watch_data(&self, s: Option<TcpStream>) {
        self.with(|st| {
            if st.fired {
                if let Some(s) = &s {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            st.data = s;
        });
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.with(|s| s.stop = true);
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
