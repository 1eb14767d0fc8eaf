//! Where "now" comes from. Every time-dependent decision takes `now` from a [`Clock`],
//! so tests move a [`ManualClock`] instead of sleeping through a cooling-off.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use time::OffsetDateTime;

/// A source of the current time, injected into everything that decides by time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock, for production.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        truncate_to_millis(OffsetDateTime::now_utc())
    }
}

/// The store keeps milliseconds; a time handed out with more precision would read back
/// different from what an answer said a moment earlier.
pub fn truncate_to_millis(t: OffsetDateTime) -> OffsetDateTime {
    from_millis(to_millis(t))
}

/// A clock that only moves when told to; cloned handles share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Starts at the current wall-clock time, truncated to whole milliseconds
    /// (the precision the store keeps).
    pub fn starting_now() -> Self {
        Self::new(truncate_to_millis(OffsetDateTime::now_utc()))
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }

    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The wall clock, for the one thing that must not follow an injected clock: browser session
/// expiry, which tower-sessions itself stamps from the wall clock.
pub fn wall_now() -> OffsetDateTime {
    truncate_to_millis(OffsetDateTime::now_utc())
}

/// Milliseconds since the Unix epoch: the form times take in the database.
pub fn to_millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The inverse of [`to_millis`]; out-of-range values clamp to the epoch rather than panic.
pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// RFC 3339 text for JSON answers and pages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// For tests that run the real binary: the wall clock plus a whole number of seconds read from
/// a file on every call, so a test moves time by writing the file instead of sleeping. It is
/// compiled into debug builds only: a release binary's clock cannot be moved from outside.
#[cfg(debug_assertions)]
#[derive(Debug, Clone)]
pub struct OffsetFileClock {
    path: std::path::PathBuf,
}

#[cfg(debug_assertions)]
impl OffsetFileClock {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

#[cfg(debug_assertions)]
impl Clock for OffsetFileClock {
    fn now(&self) -> OffsetDateTime {
        let offset = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .unwrap_or(0);
        truncate_to_millis(OffsetDateTime::now_utc() + time::Duration::seconds(offset))
    }
}

/// The clock a `stepgate` process uses: the system clock, or in debug builds the
/// [`OffsetFileClock`] named by `STEPGATE_TEST_CLOCK_FILE`.
pub fn process_clock() -> Arc<dyn Clock> {
    #[cfg(debug_assertions)]
    if let Ok(path) = std::env::var("STEPGATE_TEST_CLOCK_FILE") {
        tracing::warn!(%path, "test clock in use: time is shifted by the offset in this file");
        return Arc::new(OffsetFileClock::new(path));
    }
    Arc::new(SystemClock)
}
