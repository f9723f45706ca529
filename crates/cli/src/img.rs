//! `ferro img`: qemu-img compatible verbs over the block layer (ferro-block). Option names,
//! JSON field names and exit statuses follow qemu-img so that scripts can switch.
mod progress;

use clap::{Args, Subcommand, ValueEnum};
use ferro_block::ops::{self, CheckOutcome, CompareOptions, CompareResult, ConvertOptions, SizeChange};
use ferro_block::{CreateOptions, Format};
use progress::Bar;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct ImgArgs {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Verb {
    /// Create a new image.
    Create {
        /// Format: qcow2 or raw.
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Backing file (qcow2 only), relative to the new image's directory unless absolute.
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Format options: cluster_size=, compat=0.10|1.1, refcount_bits=, backing_file=, backing_fmt=.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
        /// Size in bytes or with a k/M/G/T suffix; defaults to the backing file's size.
        size: Option<String>,
    },
    /// Show facts about an image.
    Info {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Also show every backing file.
        #[arg(long)]
        backing_chain: bool,
        /// Read the image even if another process is writing it.
        #[arg(short = 'U', long)]
        force_share: bool,
        filename: PathBuf,
    },
    /// Check qcow2 metadata; exit 0 clean, 2 corrupt, 3 leaks, 1 check failed, 63 unsupported.
    Check {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Repair: "leaks" (or "all", which repairs leaks too).
        #[arg(short = 'r')]
        repair: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        /// Read the image even if another process is writing it (not with -r).
        #[arg(short = 'U', long)]
        force_share: bool,
        filename: PathBuf,
    },
    /// Copy an image into a new one, possibly of another format.
    Convert {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw, qcow2, or vmdk (with -o subformat=streamOptimized).
        #[arg(short = 'O', default_value = "raw")]
        output_format: String,
        /// Format options as for create; for vmdk: subformat=streamOptimized, adapter_type=ide|lsilogic|buslogic|legacyESX.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Read the source even if another process is writing it.
        #[arg(short = 'U', long)]
        force_share: bool,
        source: PathBuf,
        target: PathBuf,
    },
    /// Change the virtual size: SIZE, +DELTA or -DELTA.
    Resize {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Confirm that shrinking may lose data.
        #[arg(long)]
        shrink: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Write the image's own data into its backing file.
    Commit {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Keep the image's data instead of emptying it.
        #[arg(short = 'd')]
        keep: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
    /// Change the backing file (safe mode keeps the guest-visible content).
    Rebase {
        #[arg(short = 'f')]
        format: Option<String>,
        /// New backing file ("" for none).
        #[arg(short = 'b')]
        backing: String,
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Unsafe: only rewrite the backing file name.
        #[arg(short = 'u')]
        unsafe_mode: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
    /// Change a persistent dirty bitmap of a qcow2 image (at least one action).
    Bitmap {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Create the bitmap (enabled unless --disable).
        #[arg(long)]
        add: bool,
        /// Granularity of a new bitmap (default: the cluster size).
        #[arg(short = 'g')]
        granularity: Option<String>,
        /// Delete the bitmap.
        #[arg(long)]
        remove: bool,
        /// Clear every bit.
        #[arg(long)]
        clear: bool,
        /// Start tracking writes.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Stop tracking writes.
        #[arg(long)]
        disable: bool,
        /// Merge the bitmap SOURCE into it (from this image, or from -b SOURCE_FILE).
        #[arg(long, value_name = "SOURCE")]
        merge: Vec<String>,
        /// Image holding the --merge sources.
        #[arg(short = 'b', requires = "merge")]
        source_file: Option<PathBuf>,
        /// Format of SOURCE_FILE.
        #[arg(short = 'F', requires = "source_file")]
        source_format: Option<String>,
        filename: PathBuf,
        bitmap: String,
    },
    /// List, create, revert to or delete internal snapshots of a qcow2 image (one action).
    #[command(group = clap::ArgGroup::new("action").required(true))]
    Snapshot {
        #[arg(short = 'f')]
        format: Option<String>,
        /// List the snapshots.
        #[arg(short = 'l', group = "action")]
        list: bool,
        /// Create a snapshot named NAME.
        #[arg(short = 'c', value_name = "NAME", group = "action")]
        create: Option<String>,
        /// Revert the disk to snapshot NAME (a name, or else an id).
        #[arg(short = 'a', value_name = "NAME", group = "action")]
        apply: Option<String>,
        /// Delete snapshot NAME (a name, or else an id).
        #[arg(short = 'd', value_name = "NAME", group = "action")]
        delete: Option<String>,
        /// With -l: print a JSON array.
        #[arg(long, requires = "list")]
        json: bool,
        /// With -l: read the image even if another process is writing it.
        #[arg(short = 'U', long, requires = "list")]
        force_share: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: PathBuf,
    },
    /// Show where each range of the virtual disk is stored.
    Map {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Read the image even if another process is writing it.
        #[arg(short = 'U', long)]
        force_share: bool,
        filename: PathBuf,
    },
    /// Compare the contents of two images; exit 0 identical, 1 different, 2 error.
    Compare {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'F')]
        format2: Option<String>,
        /// Strict: images of different sizes differ.
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Read the images even if another process is writing them.
        #[arg(short = 'U', long)]
        force_share: bool,
        image1: PathBuf,
        image2: PathBuf,
    },
}

/// An error for the user: printed as "ferro img: ..." with the given exit status.
struct Failure(String, u8);

impl From<ferro_block::Error> for Failure {
    fn from(e: ferro_block::Error) -> Self {
        Failure(e.to_string(), 1)
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(msg.into(), 1))
}

pub fn run(args: ImgArgs) -> ExitCode {
    let code = match args.verb {
        Verb::Compare { .. } => 2,
        _ => 1,
    };
    match dispatch(args.verb) {
        Ok(c) => ExitCode::from(c),
        Err(Failure(msg, c)) => {
            eprintln!("ferro img: {msg}");
            ExitCode::from(if c == 1 { code } else { c })
        }
    }
}

fn format_arg(f: &Option<String>) -> Result<Option<Format>, Failure> {
    match f {
        None => Ok(None),
        Some(name) => match Format::from_name(name) {
            Some(f) => Ok(Some(f)),
            None => fail(format!("unknown format {name:?} (known: raw, qcow2, vmdk)")),
        },
    }
}

/// A size in the one grammar of ferro-vmm-api (`512`, `64k`, `1.5G`, `2T`), like qemu-img's.
fn size(what: &str, text: &str) -> Result<u64, Failure> {
    ferro_vmm_api::parse_size(text).map_err(|e| Failure(format!("invalid {what}: {e}"), 1))
}

/// `resize`'s SIZE, +DELTA or -DELTA.
fn size_change(spec: &str) -> Result<SizeChange, Failure> {
    Ok(match (spec.strip_prefix('+'), spec.strip_prefix('-')) {
        (Some(delta), _) => SizeChange::Grow(size("size", delta)?),
        (_, Some(delta)) => SizeChange::Shrink(size("size", delta)?),
        _ => SizeChange::To(size("size", spec)?),
    })
}

/// Applies qemu-img style `-o key=value,...` options to create options.
fn apply_options(o: &mut CreateOptions, options: &[String]) -> Result<(), Failure> {
    for kv in options.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "cluster_size" => o.cluster_size = size("cluster_size", v)?,
            "compat" => match v {
                "0.10" | "v2" => o.compat_v2 = true,
                "1.1" | "v3" => o.compat_v2 = false,
                _ => return fail(format!("invalid compat {v:?} (0.10 or 1.1)")),
            },
            "refcount_bits" => o.refcount_bits = v.parse().map_err(|_| Failure(format!("invalid refcount_bits {v:?}"), 1))?,
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => o.backing_format = format_arg(&Some(v.to_string()))?,
            "subformat" => o.subformat = Some(v.to_string()),
            "adapter_type" => {
                o.adapter_type = ferro_block::vmdk::Adapter::from_name(v)
                    .ok_or_else(|| Failure(format!("invalid adapter_type {v:?} (ide, lsilogic, buslogic or legacyESX)"), 1))?
            }
            "size" => o.size = Some(size("size", v)?),
            _ => return fail(format!("unsupported option {k:?}")),
        }
    }
    Ok(())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn dispatch(verb: Verb) -> Result<u8, Failure> {
    match verb {
        Verb::Create { format, backing, backing_format, options, quiet, filename, size } => {
            let fmt = format_arg(&Some(format))?.unwrap_or(Format::Raw);
            let size = size.map(|s| self::size("size", &s)).transpose()?;
            let mut o = CreateOptions::new(fmt, size);
            o.backing_file = backing;
            o.backing_format = format_arg(&backing_format)?;
            apply_options(&mut o, &options)?;
            ferro_block::create(&filename, &o)?;
            if !quiet {
                let size = ferro_block::open(&filename, Some(fmt), true)?.size();
                println!("Formatting '{}', fmt={} size={size}", display(&filename), fmt);
            }
            Ok(0)
        }
        Verb::Info { format, output, backing_chain, force_share, filename } => {
            let infos = ops::info(&filename, format_arg(&format)?, backing_chain, force_share)?;
            if output == Output::Json {
                let values = infos.iter().map(ops::info_json).collect::<Result<Vec<_>, _>>()?;
                if backing_chain {
                    print_json(&serde_json::Value::Array(values));
                } else if let Some(v) = values.first() {
                    print_json(v);
                }
            } else {
                let texts = infos.iter().map(ops::info_text).collect::<Result<Vec<_>, _>>()?;
                print!("{}", texts.join("\n"));
            }
            Ok(0)
        }
        Verb::Check { format, output, repair, quiet, force_share, filename } => {
            let repair = match repair.as_deref() {
                None => false,
                Some("leaks" | "all") => true,
                Some(r) => return fail(format!("invalid repair mode {r:?} (leaks or all)")),
            };
            let report = match ops::check(&filename, format_arg(&format)?, repair, force_share) {
                Ok(CheckOutcome::Checked(r)) => r,
                Ok(CheckOutcome::NotSupported(_)) => {
                    return Err(Failure("This image format does not support checks".into(), 63));
                }
                Err(e) => return Err(Failure(format!("Check failed: {e}"), 1)),
            };
            if output == Output::Json {
                print_json(&report.to_json(&display(&filename)));
            } else if !quiet {
                print!("{}", report.to_text());
            }
            Ok(report.exit_code())
        }
        Verb::Convert { format, output_format, options, progress, quiet, force_share, source, target } => {
            let fmt = format_arg(&Some(output_format))?.unwrap_or(Format::Raw);
            let mut dst = CreateOptions::new(fmt, None);
            apply_options(&mut dst, &options)?;
            let opts = ConvertOptions { src_format: format_arg(&format)?, force_share, dst };
            let mut bar = Bar::new(progress && !quiet);
            ops::convert(&source, &target, &opts, &mut |d, t| bar.update(d, t))?;
            bar.finish();
            Ok(0)
        }
        Verb::Resize { format, shrink, quiet, filename, size } => {
            ops::resize(&filename, format_arg(&format)?, size_change(&size)?, shrink)?;
            if !quiet {
                println!("Image resized.");
            }
            Ok(0)
        }
        Verb::Commit { format, keep, progress, quiet, filename } => {
            let mut bar = Bar::new(progress && !quiet);
            ops::commit(&filename, format_arg(&format)?, keep, &mut |d, t| bar.update(d, t))?;
            bar.finish();
            if !quiet {
                println!("Image committed.");
            }
            Ok(0)
        }
        Verb::Rebase { format, backing, backing_format, unsafe_mode, progress, quiet, filename } => {
            if format_arg(&format)?.is_some_and(|f| f != Format::Qcow2) {
                return fail("rebase needs a qcow2 image");
            }
            let new = (!backing.is_empty()).then_some(backing.as_str());
            let mut bar = Bar::new(progress && !quiet);
            ops::rebase(&filename, new, format_arg(&backing_format)?, unsafe_mode, &mut |d, t| bar.update(d, t))?;
            bar.finish();
            Ok(0)
        }
        Verb::Bitmap {
            format,
            add,
            granularity,
            remove,
            clear,
            enable,
            disable,
            merge,
            source_file,
            source_format,
            filename,
            bitmap,
        } => {
            if !(add || remove || clear || enable || disable || !merge.is_empty()) {
                return fail("bitmap needs at least one of --add, --remove, --clear, --enable, --disable, --merge");
            }
            if granularity.is_some() && !add {
                return fail("-g only applies with --add");
            }
            let source_format = format_arg(&source_format)?;
            let actions = ops::BitmapActions {
                add,
                granularity: granularity.map(|g| size("granularity", &g)).transpose()?,
                clear,
                merge,
                merge_from: source_file.map(|f| (f, source_format)),
                enable: if enable { Some(true) } else if disable { Some(false) } else { None },
                remove,
            };
            ops::bitmap(&filename, format_arg(&format)?, &bitmap, &actions)?;
            Ok(0)
        }
        Verb::Snapshot { format, list, create, apply, delete, json, force_share, quiet, filename } => {
            let action = match (&create, &apply, &delete) {
                (Some(n), _, _) => ops::SnapshotAction::Create(n),
                (_, Some(n), _) => ops::SnapshotAction::Apply(n),
                (_, _, Some(n)) => ops::SnapshotAction::Delete(n),
                _ => ops::SnapshotAction::List,
            };
            let snapshots = ops::snapshot(&filename, format_arg(&format)?, action, force_share)?;
            if list && json {
                print_json(&ops::snapshot_list_json(&snapshots));
            } else if list && !quiet && !snapshots.is_empty() {
                print!("{}", ops::snapshot_list_text(&snapshots));
            }
            Ok(0)
        }
        Verb::Map { format, output, force_share, filename } => {
            let entries = ops::map(&filename, format_arg(&format)?, force_share)?;
            if output == Output::Json {
                println!("{}", ops::map_json(&entries));
            } else {
                println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
                for e in entries.iter().filter(|e| e.data) {
                    if let Some(o) = e.offset {
                        println!("{:<#16x}{:<#16x}{:<#16x}{}", e.start, e.length, o, e.file);
                    }
                }
            }
            Ok(0)
        }
        Verb::Compare { format, format2, strict, progress, quiet, force_share, image1, image2 } => {
            let format_a = format_arg(&format)?;
            let opts = CompareOptions { format_a, format_b: format_arg(&format2)?.or(format_a), strict, force_share };
            let mut bar = Bar::new(progress && !quiet);
            let r = ops::compare(&image1, &image2, &opts, &mut |d, t| bar.update(d, t))
                .map_err(|e| Failure(e.to_string(), 2))?;
            bar.finish();
            let (msg, code) = match r {
                CompareResult::Identical => ("Images are identical.".to_string(), 0),
                CompareResult::Mismatch(off) => (format!("Content mismatch at offset {off}!"), 1),
                CompareResult::SizeMismatch => ("Strict mode: Image size mismatch!".to_string(), 1),
            };
            if !quiet {
                println!("{msg}");
            }
            Ok(code)
        }
    }
}
