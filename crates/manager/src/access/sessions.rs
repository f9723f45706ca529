//! Browser sessions: a random id, sent back in an HttpOnly cookie, stands for a token's role until
//! it expires or its owner signs out. Kept in memory only, by digest: a restarted ferrod signs
//! everyone out, and the table never holds a usable id.

use super::Role;
use super::tokens::digest;
use crate::model::now_ms;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; past it the one closest to expiry goes.
const MAX_SESSIONS: usize = 1024;

#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
}

#[derive(Clone, Copy)]
struct Session {
    role: Role,
    expires: Instant,
    expires_ms: u64,
}

/// A session just made: the id for the cookie and when it ends (ms since the epoch).
pub struct NewSession {
    pub id: String,
    pub expires_ms: u64,
}

impl Sessions {
    pub fn create(&self, role: Role) -> Result<NewSession, String> {
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| "the system's random number generator failed".to_string())?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let session = Session {
            role,
            expires: Instant::now() + SESSION_TTL,
            expires_ms: now_ms() + SESSION_TTL.as_millis() as u64,
        };
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        table.retain(|_, s| s.expires > now);
        if table.len() >= MAX_SESSIONS
            && let Some(oldest) = table.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            table.remove(&oldest);
        }
        table.insert(digest(id.as_bytes()), session);
        Ok(NewSession { id, expires_ms: session.expires_ms })
    }

    /// The role and expiry (ms since the epoch) of a live session.
    pub fn lookup(&self, id: &str) -> Option<(Role, u64)> {
        let key = digest(id.as_bytes());
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let session = *table.get(&key)?;
        if session.expires <= Instant::now() {
            table.remove(&key);
            return None;
        }
        Some((session.role, session.expires_ms))
    }

    /// Signs a session out; false if there was none.
    pub fn remove(&self, id: &str) -> bool {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).remove(&digest(id.as_bytes())).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_lookup_remove() {
        let s = Sessions::default();
        let a = s.create(Role::Admin).unwrap();
        let r = s.create(Role::Readonly).unwrap();
        assert_eq!(a.id.len(), 64);
        assert_ne!(a.id, r.id);
        assert_eq!(s.lookup(&a.id).map(|(role, _)| role), Some(Role::Admin));
        assert_eq!(s.lookup(&r.id).map(|(role, _)| role), Some(Role::Readonly));
        assert!(s.lookup(&a.id[1..]).is_none());
        assert!(s.remove(&a.id));
        assert!(s.lookup(&a.id).is_none());
        assert!(!s.remove(&a.id));
        assert!(s.lookup(&r.id).is_some());
    }

    #[test]
    fn the_table_is_bounded() {
        let s = Sessions::default();
        let first = s.create(Role::Admin).unwrap();
        for _ in 0..MAX_SESSIONS {
            s.create(Role::Admin).unwrap();
        }
        assert!(s.lookup(&first.id).is_none(), "the oldest session made room");
        assert_eq!(s.table.lock().unwrap().len(), MAX_SESSIONS);
    }
}
