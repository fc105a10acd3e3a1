//! Progress on standard error while a run reads, observes and applies
//! ([`idsync_engine::progress`]): bars on a terminal (`indicatif`: counts, rate, the time left
//! when the total is known), and in a log (stderr not a terminal: a CronJob, CI) one plain line per
//! interval for a step that has run that long, so that a long first sync never looks hung and a
//! short run prints nothing. Both show the requests sent since the step began, which keep moving
//! while a page is slow or a service throttles. `--quiet` turns progress off.

use idsync_engine::progress::{Listener, Phase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How progress shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Bars (stderr is a terminal).
    Bars,
    /// A line per interval.
    Lines(Duration),
}

/// The style for this process: none with `quiet`, bars on a terminal, else lines.
pub fn style(quiet: bool, every: Duration) -> Option<Style> {
    if quiet {
        return None;
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var("TERM").map_or(true, |t| t != "dumb");
    Some(if terminal {
        Style::Bars
    } else {
        Style::Lines(every)
    })
}

/// Installs the listener for `style`.
pub fn install(style: Style) {
    let shared = Arc::new(Mutex::new(None::<Current>));
    let tick = match style {
        Style::Bars => Duration::from_millis(500),
        Style::Lines(every) => every.min(Duration::from_secs(1)),
    };
    let listener = Progress {
        style,
        current: shared.clone(),
    };
    if !idsync_engine::progress::listen(Box::new(listener)) {
        return;
    }
    // Keeps the display moving while nothing is counted (a slow page, a throttled service,
    // planning).
    let _ = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(c) = guard.as_mut() {
                    c.tick(style);
                }
            }
        });
}

/// The step in progress.
struct Current {
    phase: Phase,
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    requests_before: u64,
    /// When the last line was printed (lines), or `started`.
    last_line: Instant,
    lines: usize,
    bar: Option<ProgressBar>,
}

fn requests_sent() -> u64 {
    idsync_connectors::http::ledger::snapshot()
        .requests
        .values()
        .sum()
}

impl Current {
    fn requests(&self) -> u64 {
        requests_sent().saturating_sub(self.requests_before)
    }

    fn tick(&mut self, style: Style) {
        match (style, &self.bar) {
            (Style::Bars, Some(bar)) => bar.set_message(self.message()),
            (Style::Lines(every), _) if self.last_line.elapsed() >= every => {
                eprintln!("{}", self.line(false));
                self.last_line = Instant::now();
                self.lines += 1;
            }
            _ => {}
        }
    }

    fn message(&self) -> String {
        match self.requests() {
            0 => self.label.clone(),
            1 => format!("{} · 1 request", self.label),
            n => format!("{} · {} requests", self.label, grouped(n)),
        }
    }

    /// A plain line: what, how many, how fast, how long, and (with a total) what is left.
    fn line(&self, done: bool) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        };
        let mut l = format!("progress: {}: {}", self.message(), grouped(self.done));
        if let Some(t) = self.total {
            let pct = (self.done * 100).checked_div(t).unwrap_or(100);
            l.push_str(&format!("/{} {} ({pct}%)", grouped(t), self.phase.unit()));
        } else {
            l.push_str(&format!(" {}", self.phase.unit()));
        }
        l.push_str(&format!(
            ", {}/s, {}",
            grouped(rate.round() as u64),
            human(secs)
        ));
        if done {
            l.push_str(", done");
        } else if let Some(t) = self.total
            && rate > 0.0
            && t > self.done
        {
            l.push_str(&format!(
                ", about {} left",
                human((t - self.done) as f64 / rate)
            ));
        }
        l
    }
}

fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// 1234567 as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Progress {
    style: Style,
    current: Arc<Mutex<Option<Current>>>,
}

impl Progress {
    fn bar(phase: Phase, total: Option<u64>, message: String) -> ProgressBar {
        let template = match total {
            Some(_) => {
                "{spinner} {msg} [{bar:24}] {human_pos}/{human_len} {prefix} ({rate}, {eta} left) {elapsed}"
            }
            None => "{spinner} {msg}: {human_pos} {prefix} ({rate}) {elapsed}",
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}/s", grouped(s.per_sec() as u64));
                },
            )
            .progress_chars("=> ");
        let bar = match total {
            Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        bar.set_style(style);
        bar.set_prefix(phase.unit());
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

impl Listener for Progress {
    fn begin(&self, phase: Phase, label: &str, total: Option<u64>) {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = guard.take()
            && let Some(bar) = old.bar
        {
            bar.abandon();
        }
        let now = Instant::now();
        let mut c = Current {
            phase,
            label: label.to_owned(),
            total,
            done: 0,
            started: now,
            requests_before: requests_sent(),
            last_line: now,
            lines: 0,
            bar: None,
        };
        if self.style == Style::Bars {
            c.bar = Some(Self::bar(phase, total, c.message()));
        }
        *guard = Some(c);
    }

    fn add(&self, phase: Phase, n: u64) {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.as_mut()
            && c.phase == phase
        {
            c.done += n;
            if let Some(bar) = &c.bar {
                bar.inc(n);
            }
        }
    }

    fn end(&self) {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.take() {
            match &c.bar {
                Some(bar) => {
                    bar.set_message(c.message());
                    // `finish` would show the total as reached; a stopped apply did not reach it.
                    if c.total.is_some_and(|t| c.done < t) {
                        bar.abandon();
                    } else {
                        bar.finish();
                    }
                }
                // A step long enough to have shown a line gets its last one.
                None if c.lines > 0 => eprintln!("{}", c.line(true)),
                None => {}
            }
        }
    }

    fn suspend(&self, print: &mut dyn FnMut()) {
        let guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref().and_then(|c| c.bar.as_ref()) {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(human(59.4), "59s");
        assert_eq!(human(95.0), "1m35s");
        assert_eq!(human(7300.0), "2h01m");
    }

    #[test]
    fn a_line_says_what_how_many_and_what_is_left() {
        let mut c = Current {
            phase: Phase::Apply,
            label: "applying to lakeFS".into(),
            total: Some(4000),
            done: 1000,
            started: Instant::now() - Duration::from_secs(10),
            requests_before: u64::MAX,
            last_line: Instant::now(),
            lines: 0,
            bar: None,
        };
        let l = c.line(false);
        assert!(
            l.starts_with("progress: applying to lakeFS: 1,000/4,000 operations (25%), 100/s, 10s, about 30s left"),
            "{l}"
        );
        c.total = None;
        c.phase = Phase::Read;
        let l = c.line(true);
        assert!(l.ends_with("1,000 entries, 100/s, 10s, done"), "{l}");
    }
}
