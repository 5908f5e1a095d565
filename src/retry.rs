//! The one retry policy: exponential backoff from a first delay, doubled on
//! each attempt, capped at five minutes. A lane retries a transient failure
//! within a batch (from the route's `retry_delay`); the daemon retries a
//! file × host across batches (from two seconds, up to `max_attempts`).

use std::time::Duration;

/// Never wait longer than this between two attempts.
pub const CAP: Duration = Duration::from_secs(300);

/// `first`, `2 × first`, `4 × first`, … up to [`CAP`].
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
}

impl Backoff {
    pub const fn new(first: Duration) -> Backoff {
        Backoff { first }
    }

    /// The wait after failed attempt `n` (1-based).
    pub fn delay(self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.first.saturating_mul(factor).min(CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_stop_at_the_cap() {
        let b = Backoff::new(Duration::from_secs(2));
        let d: Vec<u64> = (1..=10).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(d, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(
            Backoff::new(Duration::from_millis(500)).delay(1),
            Duration::from_millis(500)
        );
        assert_eq!(b.delay(u32::MAX), CAP);
        assert_eq!(Backoff::new(Duration::ZERO).delay(3), Duration::ZERO);
    }
}
