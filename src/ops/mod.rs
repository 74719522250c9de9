//! What an operator runs by hand: the dead-letter queues and the replay of the event log.
//! The commands print for a person; the functions return data, so tests call them directly.

pub mod dlq;
pub mod replay;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A one-line progress report on stderr, only when a person is watching it.
pub struct Progress {
    tty: bool,
    what: &'static str,
    last: std::cell::Cell<Option<Instant>>,
}

/// At most this often: a redraw per event would cost more than the event.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

impl Progress {
    pub fn new(what: &'static str) -> Self {
        Progress { tty: std::io::stderr().is_terminal(), what, last: std::cell::Cell::new(None) }
    }

    pub fn update(&self, done: u64) {
        if self.tty && self.last.get().is_none_or(|t| t.elapsed() >= REDRAW_EVERY) {
            self.last.set(Some(Instant::now()));
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[K{} {done}...", self.what);
            let _ = err.flush();
        }
    }

    /// Shows the final count and ends the line.
    pub fn finish(&self, done: u64) {
        if self.tty {
            let _ = writeln!(std::io::stderr(), "\r\x1b[K{} {done}", self.what);
        }
    }
}
