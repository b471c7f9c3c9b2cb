//! Progress of a long phase in bytes and time: what a phase measures ([`Measured`]), and
//! what is reported ([`Progress`]: done of total, rate, time left), computed by a
//! [`ProgressTracker`] from successive measurements. Pure: the caller passes the time.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What one look at a long phase measured, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measured {
    /// Work with a known size: the initial copy (bytes copied of the tables' size), the
    /// verification (bytes compared).
    Done { done: u64, total: u64 },
    /// Work measured by what is left: catch-up (bytes of WAL behind). The most seen since
    /// the phase began counts as the total.
    Behind(u64),
}

/// Progress as reported in notes, statuses, the record, metrics and `pgflip status --watch`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Average rate since the phase was first measured (None until a second has passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<f64>,
    /// At that rate (None while nothing has moved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_left: Option<f64>,
}

impl Progress {
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            100.0
        } else {
            100.0 * self.done_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// `120.0 MB of 300.0 MB (40%), 25.1 MB/s, 7s left`
impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} ({:.0}%)",
            bytes(self.done_bytes),
            bytes(self.total_bytes),
            self.percent()
        )?;
        if let Some(rate) = self.bytes_per_second {
            write!(f, ", {}/s", bytes(rate as u64))?;
        }
        if let Some(left) = self.seconds_left {
            write!(f, ", {} left", duration(left))?;
        }
        Ok(())
    }
}

/// Follows one phase's measurements. The rate is the average since the first measurement,
/// which smooths the steps of a copy that moves table by table.
#[derive(Debug, Clone, Default)]
pub struct ProgressTracker {
    /// The first measurement: (ms, bytes done).
    first: Option<(u64, u64)>,
    /// The most bytes behind seen (the total of a [`Measured::Behind`] phase).
    peak_behind: u64,
    /// The most done seen: a figure never goes back (a table re-measured smaller after
    /// its copy, say).
    most_done: u64,
    last_total: u64,
}

/// Below this, a rate is noise.
const MIN_RATE_WINDOW_MS: u64 = 1000;

impl ProgressTracker {
    pub fn observe(&mut self, now_ms: u64, measured: Measured) -> Progress {
        let (done, total) = match measured {
            Measured::Done { done, total } => (done.min(total), total),
            Measured::Behind(behind) => {
                self.peak_behind = self.peak_behind.max(behind);
                (self.peak_behind - behind, self.peak_behind)
            }
        };
        let done = done.max(self.most_done.min(total));
        self.most_done = done;
        self.last_total = total;
        let (since_ms, done_then) = *self.first.get_or_insert((now_ms, done));
        let elapsed = now_ms.saturating_sub(since_ms);
        let bytes_per_second = (elapsed >= MIN_RATE_WINDOW_MS)
            .then(|| done.saturating_sub(done_then) as f64 * 1000.0 / elapsed as f64);
        let seconds_left = bytes_per_second
            .filter(|r| *r > 0.0)
            .map(|r| total.saturating_sub(done) as f64 / r);
        Progress {
            done_bytes: done,
            total_bytes: total,
            bytes_per_second,
            seconds_left,
        }
    }

    /// The phase completed: everything measured is done (a copy's last tables finish
    /// between two looks).
    pub fn finish(&mut self, now_ms: u64) -> Progress {
        let total = self.last_total;
        self.observe(now_ms, Measured::Done { done: total, total })
    }
}

/// Bytes for people: `512 B`, `12.3 kB`, `4.1 MB`, `2.0 GB` (powers of 1000, as disks and
/// rates are usually given).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds for people: `42s`, `3m 05s`, `2h 10m`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_reports_rate_and_time_left() {
        let mut t = ProgressTracker::default();
        let p = t.observe(
            10_000,
            Measured::Done {
                done: 0,
                total: 1000,
            },
        );
        assert_eq!(
            (p.done_bytes, p.bytes_per_second, p.seconds_left),
            (0, None, None)
        );
        let p = t.observe(
            12_000,
            Measured::Done {
                done: 200,
                total: 1000,
            },
        );
        assert_eq!(p.bytes_per_second, Some(100.0));
        assert_eq!(p.seconds_left, Some(8.0));
        assert_eq!(p.percent(), 20.0);
        // Done never goes back, and never passes the total.
        let p = t.observe(
            13_000,
            Measured::Done {
                done: 150,
                total: 1000,
            },
        );
        assert_eq!(p.done_bytes, 200);
        let p = t.observe(
            14_000,
            Measured::Done {
                done: 5000,
                total: 1000,
            },
        );
        assert_eq!((p.done_bytes, p.seconds_left), (1000, Some(0.0)));
    }

    #[test]
    fn a_finished_phase_is_all_done() {
        let mut t = ProgressTracker::default();
        t.observe(
            0,
            Measured::Done {
                done: 0,
                total: 800,
            },
        );
        t.observe(
            1000,
            Measured::Done {
                done: 300,
                total: 900,
            },
        );
        let p = t.finish(3000);
        assert_eq!((p.done_bytes, p.total_bytes), (900, 900));
        assert_eq!(p.bytes_per_second, Some(300.0));
        let mut behind = ProgressTracker::default();
        behind.observe(0, Measured::Behind(500));
        assert_eq!(behind.finish(1000).done_bytes, 500);
    }

    #[test]
    fn catch_up_counts_from_the_most_behind() {
        let mut t = ProgressTracker::default();
        t.observe(0, Measured::Behind(600));
        let p = t.observe(1000, Measured::Behind(800));
        assert_eq!((p.done_bytes, p.total_bytes), (0, 800));
        let p = t.observe(3000, Measured::Behind(200));
        assert_eq!((p.done_bytes, p.total_bytes), (600, 800));
        assert_eq!(p.bytes_per_second, Some(200.0));
        assert_eq!(p.seconds_left, Some(1.0));
    }

    #[test]
    fn figures_for_people() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(12_345), "12.3 kB");
        assert_eq!(bytes(2_000_000_000), "2.0 GB");
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(185.0), "3m 05s");
        assert_eq!(duration(7800.0), "2h 10m");
        let p = Progress {
            done_bytes: 120_000_000,
            total_bytes: 300_000_000,
            bytes_per_second: Some(25_100_000.0),
            seconds_left: Some(7.2),
        };
        assert_eq!(
            p.to_string(),
            "120.0 MB of 300.0 MB (40%), 25.1 MB/s, 7s left"
        );
    }
}
