//! Volume clone, convert and import: a job (see `jobs`) that copies one volume into a new one of
//! the same pool, or an image file of the host into a new volume. The copy goes to a hidden
//! scratch file that is renamed into place only when complete, so a cancelled, failed or
//! interrupted copy leaves no volume behind. A linked import is no copy: a qcow2 overlay whose
//! backing file is the image.

use super::Pools;
use super::volumes::{block_format, image};
use crate::claims::Access;
use crate::domain::{DISK_FORMATS, validate_volume_name};
use crate::durable;
use crate::error::{Error, Result};
use crate::jobs::{Job, JobContext, JobError, NewJob};
use crate::model::ProgressUnit;
use ferro_block::{CreateOptions, DiskImage, Format};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes copied between two looks at the stop request (and two progress updates).
const CHUNK: usize = 4 << 20;
/// Chunks read ahead of the one being written.
const READ_AHEAD: usize = 2;
/// Granularity of zero detection: all-zero blocks are not written, so the copy stays sparse.
const ZERO_BLOCK: usize = 64 << 10;
/// Bytes looked at in one go when testing a block for zeroes.
const ZERO_PAGE: usize = 4 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The copy keeps the source's format.
    Clone,
    /// The copy is written in the format the request names.
    Convert,
}

impl CopyKind {
    fn name(self) -> &'static str {
        match self {
            CopyKind::Clone => "clone",
            CopyKind::Convert => "convert",
        }
    }
}

impl Pools {
    /// Starts a job copying volume `name` of `pool` into a new volume `target` of the same pool,
    /// in `format` (a convert must name one; a clone keeps the source's). The copy stands alone:
    /// backing data is copied in.
    pub fn copy_volume(&self, pool: &str, name: &str, kind: CopyKind, target: &str, format: Option<&str>) -> Result<Arc<Job>> {
        validate_volume_name(target).map_err(|e| Error::invalid(format!("name: {e}")))?;
        let target_format = match format {
            None if kind == CopyKind::Clone => None,
            None => return Err(Error::invalid("format: missing (raw or qcow2)")),
            Some(f) if DISK_FORMATS.contains(&f) => Some(block_format(f)),
            Some(f) => return Err(Error::invalid(format!("format: {f:?} is not raw or qcow2"))),
        };
        let source_path = self.volume_path(pool, name, false)?;
        let source_format = image(pool, name, &source_path)?.format;
        let target_format = match target_format {
            Some(f) => f,
            None if DISK_FORMATS.contains(&source_format.name()) => source_format,
            None => {
                return Err(Error::conflict(format!(
                    "volume {name} is {source_format}, which ferrod only reads; convert it to raw or qcow2 instead"
                )));
            }
        };
        let target_path = source_path.with_file_name(target);
        self.check_new_name(pool, target, &target_path)?;
        let scratch = target_path.with_file_name(format!(".{target}.part"));
        let (source, target) = (format!("{pool}/{name}"), format!("{pool}/{target}"));
        let new = NewJob {
            kind: kind.name(),
            source: source.clone(),
            target: target.clone(),
            unit: ProgressUnit::Bytes,
            scratch_files: vec![scratch.clone()],
            uses: vec![(source_path.clone(), Access::Read), (target_path.clone(), Access::Write)],
        };
        let detail = format!("{} of {source}", kind.name());
        self.start_copy(new, (source_path, source_format), (scratch, target_path, target_format), detail)
    }

    /// Runs a copy job: `source` into the hidden `scratch`, renamed to `target` when complete.
    fn start_copy(&self, new: NewJob, source: (PathBuf, Format), target: (PathBuf, PathBuf, Format), detail: String) -> Result<Arc<Job>> {
        let (events, name) = (self.events.clone(), new.target.clone());
        let ((source_path, source_format), (scratch, target_path, target_format)) = (source, target);
        self.jobs.start(new, move |ctx| async move {
            tokio::task::spawn_blocking(move || {
                copy_image(&ctx, &source_path, source_format, &scratch, target_format)?;
                durable::rename(&scratch, &target_path)
                    .map_err(|e| JobError::Failed(format!("cannot move the copy to {}: {e}", target_path.display())))
            })
            .await
            .unwrap_or_else(|e| Err(JobError::Failed(format!("image task failed: {e}"))))?;
            events.emit("volume", &name, "created", detail);
            Ok(())
        })
    }
}

/// What an import made: a job copying the image, or (linked) the overlay volume at once.
pub enum Imported {
    Job(Arc<Job>),
    Volume(crate::model::VolumeInfo),
}

impl Pools {
    /// Imports an image file of ferrod's host (qcow2, raw or VMDK, probed from its contents) into a
    /// new volume `target` of `pool` in `format`: a copy made by a job, or with `linked` a qcow2
    /// overlay backed by the image (which must then stay where it is).
    pub fn import_image(&self, pool: &str, source: &Path, target: &str, format: &str, linked: bool) -> Result<Imported> {
        validate_volume_name(target).map_err(|e| Error::invalid(format!("name: {e}")))?;
        if !source.is_absolute() {
            return Err(Error::invalid(format!("source: {} is not an absolute path", source.display())));
        }
        if !source.is_file() {
            return Err(Error::invalid(format!("source: {} is not a file on ferrod's host", source.display())));
        }
        if !DISK_FORMATS.contains(&format) {
            return Err(Error::invalid(format!("format: {format:?} is not raw or qcow2")));
        }
        let target_path = self.active_dir(pool)?.join(target);
        self.check_new_name(pool, target, &target_path)?;
        let source_format =
            ferro_block::probe(source).map_err(|e| Error::invalid(format!("source: {} is not a readable image: {e}", source.display())))?;
        if linked {
            if format != "qcow2" {
                return Err(Error::invalid("format: a linked import is a qcow2 overlay"));
            }
            let mut opts = CreateOptions::new(Format::Qcow2, None);
            opts.backing_file = Some(source.display().to_string());
            opts.backing_format = Some(source_format);
            ferro_block::create(&target_path, &opts).map_err(|e| Error::invalid(format!("source: {e}")))?;
            self.events.emit("volume", &format!("{pool}/{target}"), "created", format!("linked to {}", source.display()));
            return Ok(Imported::Volume(super::volumes::image(pool, target, &target_path)?.info));
        }
        let scratch = target_path.with_file_name(format!(".{target}.part"));
        let new = NewJob {
            kind: "import",
            source: source.display().to_string(),
            target: format!("{pool}/{target}"),
            unit: ProgressUnit::Bytes,
            scratch_files: vec![scratch.clone()],
            uses: vec![(source.to_path_buf(), Access::Read), (target_path.clone(), Access::Write)],
        };
        let detail = format!("import of {}", source.display());
        let job = self.start_copy(new, (source.to_path_buf(), source_format), (scratch, target_path, block_format(format)), detail)?;
        Ok(Imported::Job(job))
    }
}

fn failed(e: ferro_block::Error) -> JobError {
    JobError::Failed(e.to_string())
}

/// Copies the data of `src` into a new image at `dst` (see [`copy_ranges`]), checking the job's
/// stop request between chunks. Ranges the whole backing chain reads as zeroes are skipped, so
/// the copy is as sparse as the source and stands alone (no backing file). The copy is synced.
pub(crate) fn copy_image(ctx: &JobContext, src: &Path, src_format: Format, dst: &Path, dst_format: Format) -> std::result::Result<(), JobError> {
    let mut source = ferro_block::open(src, Some(src_format), true).map_err(failed)?;
    let ranges = data_ranges(source.as_mut())?;
    ctx.set_total(ranges.iter().map(|(_, len)| len).sum());
    ferro_block::create(dst, &CreateOptions::new(dst_format, Some(source.size()))).map_err(failed)?;
    let mut target = ferro_block::open(dst, Some(dst_format), false).map_err(failed)?;
    copy_ranges(ctx, source.as_mut(), target.as_mut(), &ranges, Zeroes::Skip)?;
    target.flush().map_err(failed)
}

/// The ranges `(offset, length)` of an image that do not read as zeroes through its whole
/// backing chain (as far as its metadata tells).
pub(crate) fn data_ranges(src: &mut dyn DiskImage) -> std::result::Result<Vec<(u64, u64)>, JobError> {
    Ok(ferro_block::ops::map_image(src)
        .map_err(failed)?
        .into_iter()
        .filter(|e| e.data || !e.zero)
        .map(|e| (e.start, e.length))
        .collect())
}

/// What a copy does with the all-zero blocks of the ranges it copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zeroes {
    /// Leaves them out: the new target reads zeroes there already.
    Skip,
    /// Makes them read as zeroes: the target has a backing file whose data they must hide.
    Write,
}

/// One chunk read from the source: its bytes and where they go.
struct Chunk {
    buf: Vec<u8>,
    off: u64,
    len: usize,
}

/// Copies `ranges` of `source` to the same offsets of `target`, reporting progress and checking
/// the job's stop request between chunks. A reader thread reads the next chunks (up to
/// `READ_AHEAD` of them) while this one writes, so reading and writing overlap. The caller
/// flushes `target`.
pub(crate) fn copy_ranges(
    ctx: &JobContext,
    source: &mut dyn DiskImage,
    target: &mut dyn DiskImage,
    ranges: &[(u64, u64)],
    zeroes: Zeroes,
) -> std::result::Result<(), JobError> {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<ferro_block::Result<Chunk>>(READ_AHEAD);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..=READ_AHEAD {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for (off, len) in chunks(ranges) {
                // Either channel closed: the writer stopped.
                let Ok(mut buf) = empty_rx.recv() else { return };
                let read = source.read_at(&mut buf[..len], off).map(|()| Chunk { buf, off, len });
                let failed = read.is_err();
                if full_tx.send(read).is_err() || failed {
                    return;
                }
            }
        });
        // Returning drops both channel ends, which ends the reader wherever it waits.
        write_chunks(ctx, target, zeroes, full_rx, empty_tx)
    })
}

/// The writer's side of [`copy_ranges`]: writes each chunk the reader sends and hands its
/// buffer back.
fn write_chunks(
    ctx: &JobContext,
    target: &mut dyn DiskImage,
    zeroes: Zeroes,
    full: std::sync::mpsc::Receiver<ferro_block::Result<Chunk>>,
    empty: std::sync::mpsc::Sender<Vec<u8>>,
) -> std::result::Result<(), JobError> {
    for chunk in full {
        ctx.check_stop()?;
        let chunk = chunk.map_err(failed)?;
        write_blocks(target, &chunk.buf[..chunk.len], chunk.off, zeroes).map_err(failed)?;
        ctx.advance(chunk.len as u64);
        let _ = empty.send(chunk.buf);
    }
    Ok(())
}

/// `ranges` cut into pieces of at most `CHUNK` bytes: `(offset, length)`.
fn chunks(ranges: &[(u64, u64)]) -> impl Iterator<Item = (u64, usize)> + '_ {
    ranges.iter().flat_map(|&(start, len)| {
        (start..start + len).step_by(CHUNK).map(move |off| (off, (start + len - off).min(CHUNK as u64) as usize))
    })
}

/// Whether a block is all zeroes: OR-ed together a page at a time (which the compiler turns into
/// wide vector operations), stopping at the first page that is not.
fn is_zero(block: &[u8]) -> bool {
    block.chunks(ZERO_PAGE).all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Writes the runs of `data` that are not all zeroes; the all-zero runs are left out or written
/// as zeroes, as `zeroes` says.
fn write_blocks(img: &mut dyn DiskImage, data: &[u8], off: u64, zeroes: Zeroes) -> ferro_block::Result<()> {
    let write_run = |img: &mut dyn DiskImage, start: usize, end: usize, zero: bool| match (zero, zeroes) {
        (false, _) => img.write_at(&data[start..end], off + start as u64),
        (true, Zeroes::Write) => img.write_zeroes(off + start as u64, (end - start) as u64),
        (true, Zeroes::Skip) => Ok(()),
    };
    let mut run: Option<(usize, bool)> = None;
    for (i, block) in data.chunks(ZERO_BLOCK).enumerate() {
        let at = i * ZERO_BLOCK;
        let zero = is_zero(block);
        match run {
            Some((start, run_zero)) if run_zero != zero => {
                write_run(img, start, at, run_zero)?;
                run = Some((at, zero));
            }
            None => run = Some((at, zero)),
            _ => {}
        }
    }
    match run {
        Some((start, zero)) => write_run(img, start, data.len(), zero),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_cut_into_chunks_and_zero_pages_found() {
        let c = CHUNK as u64;
        let pieces: Vec<(u64, usize)> = chunks(&[(0, 10), (c, 2 * c + 5)]).collect();
        assert_eq!(pieces, [(0, 10), (c, CHUNK), (2 * c, CHUNK), (3 * c, 5)]);
        let mut block = vec![0u8; ZERO_BLOCK];
        assert!(is_zero(&block));
        block[ZERO_BLOCK - 1] = 1;
        assert!(!is_zero(&block));
        assert!(is_zero(&block[..ZERO_PAGE + 3]));
    }

    #[test]
    fn only_nonzero_runs_are_written() {
        let dir = std::env::temp_dir().join(format!("ferro-copy-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse.raw");
        ferro_block::create(&path, &CreateOptions::new(Format::Raw, Some(4 << 20))).unwrap();
        let mut data = vec![0u8; 4 * ZERO_BLOCK];
        data[ZERO_BLOCK + 5] = 7;
        data[3 * ZERO_BLOCK..].fill(9);
        let mut img = ferro_block::open(&path, Some(Format::Raw), false).unwrap();
        write_blocks(img.as_mut(), &data, 1 << 20, Zeroes::Skip).unwrap();
        img.flush().unwrap();
        let mut back = vec![1u8; data.len()];
        img.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == data, "written data reads back");
        drop(img);
        let map = ferro_block::ops::map(&path, Some(Format::Raw), false).unwrap();
        let data_ranges: Vec<(u64, u64)> = map.iter().filter(|e| e.data).map(|e| (e.start, e.length)).collect();
        let block = ZERO_BLOCK as u64;
        assert!(
            data_ranges.iter().all(|&(s, l)| s >= (1 << 20) + block && s + l <= (1 << 20) + 4 * block),
            "zero blocks stay holes: {data_ranges:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
