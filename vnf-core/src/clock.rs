//! Wall-clock time for files and status that other processes read, next to the monotonic
//! `Instant`s the engines run on: one copy for both VNFs.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Turns monotonic instants into wall-clock seconds from one fixed reading, so the same
/// instant always gives the same second (an unchanged status gives the same file).
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    instant: Instant,
    unix_millis: u128,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            unix_millis: since_epoch().as_millis(),
        }
    }

    pub fn unix(&self, at: Instant) -> u64 {
        let millis = if at >= self.instant {
            self.unix_millis + (at - self.instant).as_millis()
        } else {
            self.unix_millis
                .saturating_sub((self.instant - at).as_millis())
        };
        u64::try_from(millis / 1000).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_maps_instants_stably() {
        let clock = WallClock::now();
        let later = clock.instant + Duration::from_millis(2500);
        assert_eq!(clock.unix(later), clock.unix(later));
        assert_eq!(
            clock.unix(later) - clock.unix(clock.instant),
            2 + u64::from((clock.unix_millis % 1000) >= 500)
        );
    }
}
