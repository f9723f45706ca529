//! The disk copies of an offline migration: the source sends each disk file the destination lacks
//! over the migration connection, only its data extents (SEEK_DATA/SEEK_HOLE: holes stay holes),
//! and the destination writes it beside its final path, syncs it and renames it there once
//! complete. The file goes as it is (a qcow2 stays a qcow2); a disk with a backing file is
//! refused, since its backing chain would not come along.
//!
//! Per disk: extents, each an offset (8 bytes, little-endian), a length (8, 1 byte to 1 MiB) and
//! that many bytes; then the end: offset `u64::MAX` and the file's size, which must be the size
//! the source described before.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

const CHUNK: u64 = 1 << 20;
const END: u64 = u64::MAX;

/// The data extents of `file` of `size` bytes: (start, end) pairs in order.
fn extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek(2) on a descriptor this function borrows; it only moves the file offset.
        let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (start as u64, (end as u64).min(size));
        if end <= start {
            break;
        }
        out.push((start, end));
        at = end;
    }
    Ok(out)
}

/// Sends disk `index` (`path`, of `format`) on `out`; `sent` hears of each chunk's bytes and
/// says whether to go on (false: the job was cancelled).
pub async fn send_disk<W: AsyncWrite + Unpin>(
    index: usize,
    path: &Path,
    format: ferro_block::Format,
    out: &mut W,
    sent: impl Fn(u64) -> bool,
) -> Result<()> {
    let shown = path.display();
    let io = |e: std::io::Error| Error::conflict(format!("disk[{index}] {shown}: {e}"));
    let chain = ferro_block::ops::info(path, Some(format), true, true).map_err(|e| Error::conflict(format!("disk[{index}] {shown}: {e}")))?;
    if chain.len() > 1 {
        return Err(Error::conflict(format!(
            "disk[{index}] {shown} has a backing file ({}); an offline migration copies single files: put it on shared storage, \
             or flatten it first (ferro img convert)",
            chain[1].path.display()
        )));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let (file, extents) = tokio::task::spawn_blocking(move || extents(&file, size).map(|e| (file, e)))
        .await
        .map_err(|e| Error::internal(format!("disk[{index}]: {e}")))?
        .map_err(io)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut buf = vec![0u8; CHUNK as usize];
    let link = |e: std::io::Error| Error::conflict(format!("disk[{index}]: the link to the destination: {e}"));
    for (start, end) in extents {
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK);
            file.seek(std::io::SeekFrom::Start(at)).await.map_err(io)?;
            file.read_exact(&mut buf[..n as usize]).await.map_err(io)?;
            out.write_all(&at.to_le_bytes()).await.map_err(link)?;
            out.write_all(&n.to_le_bytes()).await.map_err(link)?;
            out.write_all(&buf[..n as usize]).await.map_err(link)?;
            if !sent(n) {
                return Err(Error::conflict(format!("disk[{index}]: the copy was stopped")));
            }
            at += n;
        }
    }
    out.write_all(&END.to_le_bytes()).await.map_err(link)?;
    out.write_all(&size.to_le_bytes()).await.map_err(link)?;
    Ok(())
}

/// Receives disk `index` from `input` into `target` (which must not exist), `size` bytes long.
/// Nothing is left at `target` or beside it unless it all arrived.
pub async fn receive_disk<R: AsyncRead + Unpin>(index: usize, input: &mut R, target: &Path, size: u64) -> Result<()> {
    let part = part_file(target);
    let received = receive_into(index, input, &part, size).await;
    let placed = received.and_then(|()| {
        if target.exists() {
            return Err(Error::conflict(format!("disk[{index}] {}: appeared while it was copied", target.display())));
        }
        crate::durable::rename(&part, target).map_err(|e| Error::internal(format!("disk[{index}] {}: {e}", target.display())))
    });
    if placed.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    placed
}

async fn receive_into<R: AsyncRead + Unpin>(index: usize, input: &mut R, part: &Path, size: u64) -> Result<()> {
    let io = |e: std::io::Error| Error::internal(format!("disk[{index}] {}: {e}", part.display()));
    let link = |e: std::io::Error| Error::conflict(format!("disk[{index}]: the link to the source: {e}"));
    let mut file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(part).await.map_err(io)?;
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let offset = input.read_u64_le().await.map_err(link)?;
        let length = input.read_u64_le().await.map_err(link)?;
        if offset == END {
            if length != size {
                return Err(Error::invalid(format!("disk[{index}]: the source sent {length} bytes' worth, it described {size}")));
            }
            file.set_len(size).await.map_err(io)?;
            file.sync_all().await.map_err(io)?;
            return Ok(());
        }
        if length == 0 || length > CHUNK || offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(Error::invalid(format!(
                "disk[{index}]: an extent of {length} bytes at {offset} does not fit the {size}-byte disk in 1 MiB pieces"
            )));
        }
        input.read_exact(&mut buf[..length as usize]).await.map_err(link)?;
        file.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
        file.write_all(&buf[..length as usize]).await.map_err(io)?;
    }
}

/// Where a disk is written until it is complete: beside its final path, hidden.
fn part_file(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.migrating"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse file goes over as its data extents and comes back byte for byte, holes kept; a
    /// stream that claims more than the disk holds is refused and leaves nothing.
    #[tokio::test]
    async fn a_sparse_disk_arrives_whole_and_a_lying_stream_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("ferro-migration-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("disk.raw");
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::File::create(&source).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all(&[1u8; 5000]).unwrap();
            f.seek(std::io::SeekFrom::Start(40 << 20)).unwrap();
            f.write_all(&vec![2u8; 3 << 20]).unwrap();
        }
        let mut wire = Vec::new();
        let sent = std::sync::atomic::AtomicU64::new(0);
        send_disk(0, &source, ferro_block::Format::Raw, &mut wire, |n| sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed) < u64::MAX).await.unwrap();
        let sent = sent.into_inner();
        assert!((5000 + (3 << 20)..8 << 20).contains(&sent), "only the data went: {sent}");
        let target = dir.join("copy.raw");
        receive_disk(0, &mut wire.as_slice(), &target, 64 << 20).await.unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&source).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&target).unwrap().blocks() * 512 < 16 << 20, "the holes stay holes");

        let lying = dir.join("lying.raw");
        let e = receive_disk(0, &mut wire.as_slice(), &lying, 1 << 20).await.unwrap_err();
        assert!(e.message.contains("does not fit the 1048576-byte disk"), "{e}");
        let cut = &wire[..wire.len() / 2];
        assert!(receive_disk(0, &mut &cut[..], &lying, 64 << 20).await.is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "nothing of the refused copies is left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
