//! Lifecycle events: a bounded history for `GET /v1/events` plus a broadcast for followers.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// How many past events the daemon keeps for clients that connect later.
const HISTORY: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Increases by one per event since the daemon started.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// "domain", "pool", "volume" or "job" (named by its id).
    pub object: &'static str,
    pub name: String,
    /// What happened: defined, undefined, started, stopped, crashed, paused, resumed, reset, ...;
    /// for jobs: started, then completed, failed or cancelled.
    pub kind: &'static str,
    pub detail: String,
}

pub struct EventHub {
    history: Mutex<(u64, VecDeque<Event>)>,
    sender: broadcast::Sender<Event>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub { history: Mutex::new((0, VecDeque::new())), sender: broadcast::channel(HISTORY).0 }
    }
}

impl EventHub {
    pub fn emit(&self, object: &'static str, name: &str, kind: &'static str, detail: impl Into<String>) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.0 += 1;
        let event = Event {
            seq: history.0,
            time_ms: crate::model::now_ms(),
            object,
            name: name.to_string(),
            kind,
            detail: detail.into(),
        };
        tracing::info!(object, name, kind, detail = %event.detail, "event");
        if history.1.len() == HISTORY {
            history.1.pop_front();
        }
        history.1.push_back(event.clone());
        // Sent under the lock so followers see events in sequence order; no receiver is fine.
        let _ = self.sender.send(event);
    }

    /// Past events with `seq > since`.
    pub fn since(&self, since: u64) -> Vec<Event> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.1.iter().filter(|e| e.seq > since).cloned().collect()
    }

    /// Past events with `seq > since` and a receiver for everything after them, taken atomically.
    pub fn follow(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let past = history.1.iter().filter(|e| e.seq > since).cloned().collect();
        (past, self.sender.subscribe())
    }
}
