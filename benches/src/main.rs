//! `ferro-bench`: Ferrovisor's numbers beside a peer measured in the same run.
//!
//! Each section is a subcommand in its own module; `ferro-bench --help` lists them. Run on an
//! idle machine after `cargo build --release -p ferro-cli -p ferro-bench`:
//! `target/release/ferro-bench launch`. Numbers are medians; ratios are ours / peer. The peers
//! are QEMU from Debian (`common::qemu_bin`), the host itself, and the raw-ioctl floor
//! (`floor`: KVM ioctls and a few guest instructions, no VMM).

mod backup;
mod backup_running;
mod common;
mod disk_snapshot;
mod exits;
mod floor;
mod images;
mod jail;
mod launch;
mod memory;
mod migrate;
mod network;
mod snapshot;
mod virtio;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferro-bench", about = "Ferrovisor benchmarks, each beside a peer measured in the same run")]
struct Cli {
    #[command(subcommand)]
    section: Section,
}

#[derive(Subcommand)]
enum Section {
    /// Launch to first output to exit and peak RSS against QEMU microvm; first instruction against the raw-ioctl floor.
    Launch {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// PIO and MMIO exit round trips against the raw-ioctl floor.
    Exits {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// virtio-blk and virtio-net throughput against QEMU q35 and the host.
    Virtio {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Disk conversion for OVF/OVA import and export (VMDK <-> qcow2/raw) against qemu-img.
    Images {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// TCP throughput of Linux guests through a bridge, guest to guest and to an outside host, against QEMU.
    Network {
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Snapshot pause time and restore -> guest answering at 256 MiB and 2 GiB, against QEMU (migration to a file, -incoming).
    Snapshot {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// qcow2 internal snapshot create, revert and delete on a 1 GiB written image against qemu-img.
    DiskSnapshot {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Huge pages against ordinary guest RAM: a 1 GiB ring-3 memory touch and a 4 GiB boot, against QEMU with -mem-path on hugetlbfs.
    Memory {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Live migration downtime and total time, idle and dirtying 512 MiB guest, VMM to VMM and ferrod to ferrod (TLS), against QEMU live migration (-incoming tcp:).
    Migrate {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Full and incremental backups of a 1 GiB qcow2 disk against qemu-img convert of the same disk.
    Backup {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Full and incremental backups of a running domain whose guest writes its disk: backup time and the guest's write throughput during it, against QEMU blockdev-backup and qemu-img convert -U.
    BackupRunning {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Start-to-exit and PIO exit round trips of jailed, seccomp-filtered VMMs against plain ones, both under ferrod.
    Jail {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The floor's child process (spawned by `launch`).
    #[command(hide = true)]
    FloorChild,
}

fn main() {
    match Cli::parse().section {
        Section::Launch { runs } => launch::run(runs),
        Section::Exits { rounds } => exits::run(rounds),
        Section::Virtio { runs } => {
            let scratch = common::Scratch::new();
            virtio::run(&common::ferro_bin(), runs, &scratch.0);
        }
        Section::Images { runs } => images::run(runs),
        Section::Network { runs } => network::run(runs),
        Section::Snapshot { runs } => snapshot::run(runs),
        Section::DiskSnapshot { runs } => disk_snapshot::run(runs),
        Section::Memory { runs } => memory::run(runs),
        Section::Migrate { runs } => migrate::run(runs),
        Section::Backup { runs } => backup::run(runs),
        Section::BackupRunning { runs } => backup_running::run(runs),
        Section::Jail { runs } => jail::run(runs),
        Section::FloorChild => floor::first_exit_child(),
    }
}
