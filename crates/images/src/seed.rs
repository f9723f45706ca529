//! cloud-init NoCloud seed volumes: a small VFAT filesystem labelled `cidata` holding `meta-data`,
//! `user-data` and (if given) `network-config`, which cloud-init finds by its label on first boot.
//! The volume is written to a temporary file and renamed into place; its timestamps and volume id
//! are fixed, so the same inputs always give the same bytes.

use crate::Error;
use std::io::Write;
use std::path::Path;

/// Largest content of one seed file.
pub const MAX_FILE: usize = 256 << 10;
/// The volume label cloud-init looks for.
pub const LABEL: &[u8; 11] = b"cidata     ";

/// The three NoCloud files; `meta_data` is required by cloud-init (instance-id at least).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: Option<String>,
}

impl Seed {
    /// The meta-data cloud-init needs when the user gives none: a stable instance-id (a new id
    /// makes cloud-init run its per-instance steps again) and the host name.
    pub fn default_meta_data(instance_id: &str, hostname: &str) -> String {
        format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
    }

    fn files(&self) -> Vec<(&'static str, &str)> {
        let mut files = vec![("meta-data", self.meta_data.as_str()), ("user-data", self.user_data.as_str())];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n.as_str()));
        }
        files
    }

    /// Writes the seed volume to `path` (a raw image), replacing any earlier one.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let files = self.files();
        for (name, content) in &files {
            if content.len() > MAX_FILE {
                return Err(Error::new(format!("cloud-init {name} is {} bytes (at most {MAX_FILE})", content.len())));
            }
        }
        let content: usize = files.iter().map(|(_, c)| c.len()).sum();
        // FAT12 with room for the files twice over; 1 MiB at least.
        let size = (1u64 << 20).max((2 * content as u64 + (512 << 10)).next_multiple_of(1 << 20));
        let tmp = path.with_extension("part");
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
            file.set_len(size)?;
            let options = fatfs::FormatVolumeOptions::new().volume_label(*LABEL).volume_id(0x0c1d_a7a0);
            fatfs::format_volume(&mut file, options)?;
            {
                let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
                for (name, content) in &files {
                    let mut f = fs.root_dir().create_file(name)?;
                    f.write_all(content.as_bytes())?;
                    f.flush()?;
                }
                fs.unmount()?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::new(format!("cannot write the cloud-init seed {}: {e}", path.display()))
        })
    }
}
