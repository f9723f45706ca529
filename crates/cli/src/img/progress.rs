//! A one-line progress bar on stderr, drawn only when stderr is a terminal (`-p`).
use std::io::{IsTerminal, Write};

pub struct Bar {
    enabled: bool,
    last: Option<u64>,
}

impl Bar {
    pub fn new(requested: bool) -> Bar {
        Bar { enabled: requested && std::io::stderr().is_terminal(), last: None }
    }

    /// Redraws when the whole percentage changes.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        if self.last == Some(pct) {
            return;
        }
        self.last = Some(pct);
        let filled = (pct / 2) as usize;
        let mut err = std::io::stderr();
        let _ = write!(err, "\r    ({pct:>3}/100%) [{}{}]", "#".repeat(filled), " ".repeat(50 - filled));
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            eprintln!();
        }
    }
}
