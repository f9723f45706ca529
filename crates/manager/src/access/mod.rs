//! Who may use the API: the roles, the peer a request came from, API tokens (`tokens`) and browser
//! sessions (`sessions`). Knows nothing of HTTP; `api/auth.rs` applies it to requests.

pub mod sessions;
pub mod tokens;

use std::net::SocketAddr;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads only (GET and HEAD); no change, no console.
    Readonly,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Readonly => "readonly",
        }
    }
}

/// The other end of a connection, attached to every request it carries.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// A local client on the unix socket, with its credentials (SO_PEERCRED); None if the kernel
    /// did not give them.
    Unix(Option<Credentials>),
    /// A client on a TCP listener; `tls` is false only on a loopback `--insecure` listener.
    Tcp { addr: SocketAddr, tls: bool },
}

/// A local process's identity as the kernel saw it when it connected.
#[derive(Debug, Clone, Copy)]
pub struct Credentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What the TCP listeners accept: the tokens, the sessions made from them, and whether a loopback
/// `--insecure` listener was opened to everyone with `--no-auth`.
pub struct Access {
    pub tokens: tokens::Tokens,
    pub sessions: sessions::Sessions,
    pub open: bool,
}

impl Access {
    pub fn new(tokens: tokens::Tokens, open: bool) -> Access {
        Access { tokens, sessions: sessions::Sessions::default(), open }
    }
}
