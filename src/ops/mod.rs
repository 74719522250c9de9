//! What an operator runs by hand: the dead-letter queues and the replay of the event log.
//! The commands print for a person; the functions return data, so tests call them directly.

pub mod dlq;
pub mod replay;

use std::io::{IsTerminal, Write};

/// A one-line progress report on stderr, only when a person is watching it.
pub struct Progress {
    tty: bool,
    what: &'static str,
}

impl Progress {
    pub fn new(what: &'static str) -> Self {
        Progress { tty: std::io::stderr().is_terminal(), what }
    }

    pub fn update(&self, done: u64) {
        if self.tty {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r{} {done}...", self.what);
            let _ = err.flush();
        }
    }

    pub fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}
