//! Progress live in the terminal: `pgflip status --watch`, and the demo. A line per phase
//! as it changes; during a phase that measures bytes (the initial copy, catch-up), a
//! progress bar with the rate and the time left, from what the driver keeps in the record
//! (not a terminal — a log, a pipe: a line per new figure instead).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pgflip_core::plan::Record;
use pgflip_core::progress::duration;
use std::io::IsTerminal;
use std::time::Instant;

pub struct Watch {
    started: Instant,
    last_line: String,
    bar: Option<ProgressBar>,
    /// Whether stdout is a terminal (a bar), or not (lines).
    terminal: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            started: Instant::now(),
            last_line: String::new(),
            bar: None,
            terminal: std::io::stdout().is_terminal(),
        }
    }
}

impl Watch {
    /// Shows `record`: a new line when the phase (or `detail`) changed, the bar while the
    /// phase reports bytes.
    pub fn show(&mut self, record: &Record, detail: Option<&str>) {
        let Some(attempt) = &record.attempt else {
            self.finish_bar();
            return;
        };
        let mut line = format!("{} → {}: {}", attempt.from, attempt.to, attempt.phase);
        if let Some(d) = detail {
            line = format!("{line} — {d}");
        }
        if !self.terminal
            && let Some(p) = attempt.progress
        {
            line = format!("{line}: {p}");
        }
        if (attempt.progress.is_none() || !self.terminal) && line != self.last_line {
            self.finish_bar();
            println!("  {:>6.1}s  {line}", self.started.elapsed().as_secs_f64());
            self.last_line = line;
        }
        if let Some(p) = attempt.progress.filter(|_| self.terminal) {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(
                    Some(p.total_bytes),
                    ProgressDrawTarget::stdout(),
                );
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {msg:24} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {prefix}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar
            });
            bar.set_message(format!("{}", attempt.phase));
            bar.set_length(p.total_bytes);
            bar.set_position(p.done_bytes);
            // The rate and time left as the driver measured them (the bar's own would be
            // from this terminal's samples only).
            let mut prefix = String::new();
            if let Some(rate) = p.bytes_per_second {
                prefix.push_str(&format!("{}/s", pgflip_core::progress::bytes(rate as u64)));
            }
            if let Some(left) = p.seconds_left {
                prefix.push_str(&format!(", {} left", duration(left)));
            }
            bar.set_prefix(prefix);
        }
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.finish_bar();
    }
}
