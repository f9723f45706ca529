//! The frame of a snapshot's state file (docs/snapshot-format.md): a 56-byte header (magic,
//! format version, body length, SHA-256 of the body) before the JSON body. The VMM writes and
//! reads state files through it; ferrod checks a snapshot's file with it before it stops a domain
//! to revert to that snapshot.

use sha2::{Digest, Sha256};
use std::path::Path;

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FERROSNP";
/// The version of the state file as a whole: header and body. The body's saved VM carries its
/// own version, which the VMM checks too.
pub const FORMAT_VERSION: u32 = 1;
/// magic, version (u32), reserved (u32), body length (u64), SHA-256 of the body.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// No state file body is anywhere near this; a larger length is a damaged header.
const MAX_BODY: u64 = 256 << 20;

/// A state file holding `body`: the header, then the body.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(body));
    out.extend_from_slice(body);
    out
}

/// Reads state file `path` and returns its body once the header checks out: the magic, the
/// format version, the length and the checksum. The error is one line naming the file.
///
/// The file lies in a snapshot directory the VMM writes, and ferrod (root) reads it too: a
/// symbolic link there is not followed, and anything but a regular file of at most a state
/// file's size is refused before it is read (a link to /dev/zero would never end, a FIFO would
/// never answer).
pub fn read_body(path: &Path) -> Result<Vec<u8>, String> {
    use crate::vmm_file::{self, Unreadable};
    let name = path.display();
    let most = HEADER_LEN as u64 + MAX_BODY;
    let bytes = vmm_file::read(path, most).map_err(|e| match e {
        _ if e.is_link() => format!("state file {name}: is a symbolic link, which is not followed"),
        Unreadable::Open(e) | Unreadable::Read(e) => format!("state file {name}: {e}"),
        Unreadable::NotRegular => format!("state file {name}: not a regular file"),
        Unreadable::TooLarge(len) => format!("state file {name}: {len} bytes, larger than any state file ({most})"),
    })?;
    if bytes.len() < HEADER_LEN {
        return Err(format!("state file {name}: truncated ({} bytes, the header alone is {HEADER_LEN})", bytes.len()));
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if header[..8] != MAGIC {
        return Err(format!("state file {name}: not a Ferrovisor snapshot state file (bad magic)"));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(format!("state file {name}: format version {version}, this build reads version {FORMAT_VERSION}"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_BODY || len != body.len() as u64 {
        return Err(format!("state file {name}: truncated or damaged (header says {len} bytes of state, the file has {})", body.len()));
    }
    if header[24..56] != Sha256::digest(body)[..] {
        return Err(format!("state file {name}: checksum mismatch (the file is damaged)"));
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_body_reads_back_and_any_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("ferro-state-frame-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let sealed = seal(br#"{"config":{}}"#);
        std::fs::write(&path, &sealed).unwrap();
        assert_eq!(read_body(&path).unwrap(), br#"{"config":{}}"#);
        let damaged = |at: usize, why: &str| {
            let mut bytes = sealed.clone();
            bytes[at] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
            let e = read_body(&path).unwrap_err();
            assert!(e.contains(why), "byte {at}: {e}");
        };
        damaged(0, "bad magic");
        damaged(8, "format version 0");
        damaged(16, "truncated or damaged");
        damaged(HEADER_LEN + 3, "checksum mismatch");
        std::fs::write(&path, &sealed[..HEADER_LEN - 1]).unwrap();
        assert!(read_body(&path).unwrap_err().contains("truncated (55 bytes"));
        // What a VMM could plant in its snapshot directory for ferrod to read.
        std::fs::write(&path, &sealed).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read_body(&link).unwrap_err(), format!("state file {}: is a symbolic link, which is not followed", link.display()));
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read_body(&zero).unwrap_err().contains("symbolic link"));
        assert_eq!(read_body(Path::new("/dev/zero")).unwrap_err(), "state file /dev/zero: not a regular file");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(read_body(&path).unwrap_err().starts_with(&format!("state file {}: ", path.display())));
    }
}
