//! API tokens for the TCP listeners, read once at start from `--token-file`, each with its role.
//!
//! The file (docs/remote.md): blank lines and lines starting with `#` are ignored; every other line
//! is `TOKEN [ROLE]`, ROLE being `admin` (the default) or `readonly`; a token is 16 to 512 visible
//! ASCII characters. The first token is the one `ferro --token-file` sends. Only SHA-256 digests
//! of the tokens are kept, and a presented token is compared against every one of them in constant
//! time.

use super::Role;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const MIN_TOKEN: usize = 16;
const MAX_TOKEN: usize = 512;

/// The accepted tokens (their digests) and their roles.
pub struct Tokens {
    entries: Vec<([u8; 32], Role)>,
}

impl Tokens {
    /// No token at all (no TCP listener, or `--no-auth`).
    pub fn none() -> Tokens {
        Tokens { entries: Vec::new() }
    }

    /// Reads a token file, refusing one that group or others could read.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open the token file {shown}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("cannot stat the token file {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("the token file {shown} is not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "the token file {shown} is readable by group or others (mode {mode:03o}); run: chmod 600 {shown}"
            ));
        }
        let text = std::io::read_to_string(file).map_err(|e| format!("cannot read the token file {shown}: {e}"))?;
        Tokens::parse(&text).map_err(|e| format!("token file {shown}: {e}"))
    }

    /// Parses the file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries: Vec<([u8; 32], Role)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = index + 1;
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default();
            let role = match words.next() {
                None | Some("admin") => Role::Admin,
                Some("readonly") => Role::Readonly,
                Some(other) => return Err(format!("line {at}: role {other:?} is not admin or readonly")),
            };
            if words.next().is_some() {
                return Err(format!("line {at}: expected TOKEN [admin|readonly], found more words"));
            }
            if !(MIN_TOKEN..=MAX_TOKEN).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {at}: a token is {MIN_TOKEN} to {MAX_TOKEN} visible ASCII characters (make one with: openssl rand -hex 32)"
                ));
            }
            let hash = digest(token.as_bytes());
            if entries.iter().any(|(h, _)| *h == hash) {
                return Err(format!("line {at}: the same token appears twice"));
            }
            entries.push((hash, role));
        }
        if entries.is_empty() {
            return Err("no token in the file (one per line: TOKEN [admin|readonly])".to_string());
        }
        Ok(Tokens { entries })
    }

    /// The role of a presented token, or None if it is none of ours. Looks at every entry whatever
    /// matches, and compares digests without an early exit.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let hash = digest(presented.as_bytes());
        let mut role = None;
        for (entry, entry_role) in &self.entries {
            if same_digest(entry, &hash) {
                role = Some(*entry_role);
            }
        }
        role
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123";
    const R: &str = "readonly-token-0000000";

    #[test]
    fn roles_comments_and_the_default() {
        let t = Tokens::parse(&format!("# ferrod tokens\n\n{A}\n  {R} readonly  \n")).unwrap();
        assert_eq!(t.role_of(A), Some(Role::Admin));
        assert_eq!(t.role_of(R), Some(Role::Readonly));
        assert_eq!(t.role_of("0123456789abcdef012"), None);
        assert_eq!(t.role_of(""), None);
        assert_eq!(t.role_of(&format!("{A} ")), None);
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, wanted) in [
            ("", "no token"),
            ("# only a comment\n", "no token"),
            ("short\n", "line 1: a token is 16"),
            (&format!("{A}\n{A} readonly\n")[..], "line 2: the same token"),
            (&format!("{A} root\n")[..], "line 1: role \"root\""),
            (&format!("\n{A} admin extra\n")[..], "line 2: expected TOKEN"),
            ("tökén-with-ümlauts-and-more\n", "line 1: a token is"),
        ] {
            let err = Tokens::parse(text).err().unwrap_or_else(|| panic!("{text:?} was accepted"));
            assert!(err.starts_with(wanted), "{text:?}: {err}");
        }
    }
}
