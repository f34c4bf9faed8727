//! Time: the one place relay reads a clock.
//!
//! Every decision on relay's own schedule (due times, leases, retention,
//! payload URL expiry) reads [`Clock::now`], and every duration that is
//! measured starts at [`stopwatch`]; both follow tokio's clock, so tests that
//! pause it move them. A time another host wrote (a signature's timestamp)
//! is compared with [`wall_time`], the system clock as it stands, since
//! `Clock::now` keeps the offset it started with when the system clock is
//! stepped. Nothing else calls `SystemTime::now` or `Instant::now`
//! (clippy.toml's `disallowed-methods` keeps it so).

use std::time::SystemTime;

/// Wall-clock time that advances with tokio's clock: the system time at
/// start plus the monotonic time since. Tests that pause tokio's clock move
/// it; in production it is the system time without the jumps a clock
/// adjustment would put into retry schedules.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: SystemTime,
    start: tokio::time::Instant,
}

impl Clock {
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Clock {
        Clock {
            wall: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// The start of a measured duration (a send, a commit): read `elapsed()` on it.
#[allow(clippy::disallowed_methods)]
pub fn stopwatch() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// The system's wall-clock time as it stands: to compare with a time another
/// host wrote, and for the CLI's one-shot commands, which keep no [`Clock`].
#[allow(clippy::disallowed_methods)]
pub fn wall_time() -> SystemTime {
    SystemTime::now()
}
