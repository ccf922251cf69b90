//! The control plane's one clock. Time enters commands only here, at the edge:
//! the server hands a [`Clock`] to the control API and the scheduling loop when it
//! starts them, and the state machine never reads one (its timestamps come from
//! the commands it applies). Tests hand in a [`ManualClock`] to set time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aigrid_api::Timestamp;

/// Where the edge reads the time it writes into commands.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// A clock shared by the handlers and loops of one server.
pub type SharedClock = Arc<dyn Clock>;

/// The machine's wall clock, in Unix milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `at`.
    pub fn at(at: Timestamp) -> Self {
        ManualClock(AtomicU64::new(at.as_millis()))
    }

    /// Moves the clock to `at` (also backwards: tests of skew need that).
    pub fn set(&self, at: Timestamp) {
        self.0.store(at.as_millis(), Ordering::SeqCst);
    }

    /// Moves the clock forward by `millis`.
    pub fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::at(Timestamp::from_millis(1_000));
        assert_eq!(clock.now(), Timestamp::from_millis(1_000));
        clock.advance(500);
        assert_eq!(clock.now(), Timestamp::from_millis(1_500));
        clock.set(Timestamp::from_millis(10));
        assert_eq!(clock.now(), Timestamp::from_millis(10));
    }

    #[test]
    fn the_system_clock_reads_unix_milliseconds() {
        // 2020-01-01 in Unix milliseconds: any machine running this is later.
        assert!(SystemClock.now() > Timestamp::from_millis(1_577_836_800_000));
    }
}
