//! How a running stage's progress and log reach the user: an indicatif bar per running
//! stage (only on a terminal), and a log file in the attempt's scratch directory that is
//! stored with the stage record.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tracking::StageTrack;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipe_stages::Reporter;

/// Progress bars for a whole run.
pub struct Bars {
    multi: MultiProgress,
    enabled: bool,
}

impl Bars {
    /// Bars drawn on stderr when it is a terminal and `enabled`.
    pub fn new(enabled: bool) -> Self {
        let enabled = enabled && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let target = if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            enabled,
        }
    }

    /// A bar for one stage.
    pub fn stage(&self, name: &str) -> Option<ProgressBar> {
        if !self.enabled {
            return None;
        }
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:<24} {elapsed:>4} {wide_bar} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        Some(bar)
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        if self.enabled {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }
}

/// The reporter handed to one stage attempt.
pub struct StageReporter {
    stage: String,
    /// The stage's MLflow run, when the run is tracked.
    track: Option<Arc<StageTrack>>,
    log: Mutex<BufWriter<File>>,
    bar: Option<ProgressBar>,
    echo: bool,
}

impl StageReporter {
    /// Logs to `log_path`; draws on `bar`; with `echo`, also prints log lines to stderr.
    pub fn new(
        stage: &str,
        log_path: &Path,
        bar: Option<ProgressBar>,
        echo: bool,
    ) -> std::io::Result<Self> {
        Ok(StageReporter {
            stage: stage.to_owned(),
            track: None,
            log: Mutex::new(BufWriter::new(File::create(log_path)?)),
            bar,
            echo,
        })
    }

    /// Sends the stage's step scalars to its tracked run.
    pub fn with_track(mut self, track: Option<Arc<StageTrack>>) -> Self {
        self.track = track;
        self
    }

    /// Flushes the log and removes the bar.
    pub fn finish(&self) {
        if let Ok(mut log) = self.log.lock() {
            let _ = log.flush();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Reporter for StageReporter {
    fn progress(&self, done: u64, total: Option<u64>, message: &str) {
        if let Some(bar) = &self.bar {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
            bar.set_message(message.to_owned());
        }
    }

    fn log(&self, line: &str) {
        tracing::debug!(stage = %self.stage, "{line}");
        if self.echo {
            match &self.bar {
                Some(bar) => bar.println(format!("[{}] {line}", self.stage)),
                None => eprintln!("[{}] {line}", self.stage),
            }
        }
        if let Ok(mut log) = self.log.lock() {
            let _ = writeln!(log, "{line}");
        }
    }

    fn scalars(&self, step: u64, values: &[(&str, f64)]) {
        if let Some(t) = &self.track {
            t.scalars(step, values);
        }
    }
}
