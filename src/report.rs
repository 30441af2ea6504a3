//! Progress and notes on stderr, and the shape of error messages.
//!
//! Engines receive a [`Reporter`] and never print themselves, so `-q` silences everything but
//! errors and a command's own results in one place.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, Default)]
pub struct Reporter {
    pub quiet: bool,
}

impl Reporter {
    pub fn new(quiet: bool) -> Reporter {
        Reporter { quiet }
    }

    /// A line for the user on stderr (not part of a command's results).
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A warning on stderr, shown even with `-q`: something found that makes the results
    /// likely wrong, said before the work that produces them.
    pub fn warn(&self, msg: impl AsRef<str>) {
        eprintln!("warning: {}", msg.as_ref());
    }

    /// A progress bar over `total` bytes; hidden with `-q` or when stderr is not a terminal.
    pub fn bytes_bar(&self, total: u64, what: &str) -> ProgressBar {
        self.bar(
            total,
            what,
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
    }

    /// A progress bar over `total` images with the rate; hidden with `-q` or when stderr is not
    /// a terminal.
    pub fn images_bar(&self, total: u64, what: &str) -> ProgressBar {
        self.bar(
            total,
            what,
            "{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
    }

    fn bar(&self, total: u64, what: &str, template: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

/// Whether an error is a closed stdout (`ckpt inspect x | head`), which is not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// An error and its causes on one line: `context: cause: root cause`.
///
/// Only each cause's first line is kept: candle appends a backtrace on the following lines of
/// its errors when RUST_BACKTRACE is set, which is no part of what the user needs to read.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim().to_string();
        // anyhow contexts often repeat their source's message; say it once.
        if !first.is_empty() && parts.last() != Some(&first) {
            parts.push(first);
        }
    }
    parts.join(": ")
}

/// Bytes in human units (decimal, as disk sizes are usually quoted).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Testing hook, for the test suite only (not a user option): `CKPT_TEST_PAUSE=<point>:<path>`
/// stops the process once, at the named point of its run, until it has read `<path>` to its end.
/// With a FIFO there, a test knows ckpt has stopped when its own open of the FIFO for writing
/// succeeds; it then truncates or rewrites an input, or signals the process, and lets it go on
/// by closing the FIFO: something happens at a known moment of the run, with no timing luck.
/// Points: `opened` (right after the first output's temporary file is created: every input open
/// and mapped, nothing averaged or copied yet), `average` (outputs created, before the averaging
/// pass) and `calibrate` (before a calibration pass's first batch).
pub fn test_pause(point: &str) {
    static PAUSED: std::sync::Once = std::sync::Once::new();
    let Some(spec) = std::env::var_os("CKPT_TEST_PAUSE") else {
        return;
    };
    let spec = spec.to_string_lossy();
    if let Some((p, path)) = spec.split_once(':') {
        if p == point {
            PAUSED.call_once(|| {
                let _ = std::fs::read(path);
            });
        }
    }
}

/// The process's peak resident memory in kB (Linux's VmHWM), if the system says.
///
/// Unlike the `ru_maxrss` a parent reads with `wait4`, this counts only this program: `ru_maxrss`
/// keeps the high-water mark of the process image that `exec` replaced, which for a child of a
/// large process (a test runner, a Python benchmark) is that process's size.
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `CKPT_REPORT_PEAK_RSS=1`: the binary ends with one stderr line `ckpt: peak resident memory N
/// kB`, for tests and benchmarks that hold memory use to a bound, then one line with what its
/// allocator holds (`ckpt: allocator cache N kB, live N kB, peak requested N kB, fresh N kB`, see
/// [`crate::alloc`]).
pub const PEAK_RSS_ENV: &str = "CKPT_REPORT_PEAK_RSS";
