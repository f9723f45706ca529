//! Crash safety: a child process does allocating writes with periodic flushes and is killed
//! with SIGKILL at random moments. After every kill, `qemu-img check` must find no corruption
//! (leaks are allowed and reported) and every write flushed before the kill must read back.
//!
//! The child is this same test binary re-executed with FERRO_CRASH_CHILD set.
mod common;
use common::*;
use ferro_block::{CreateOptions, Format, create, open};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REGION: u64 = 100 * 1024;
const ROUNDS: u32 = 24;

/// Write `i`: a distinct region, so later (unflushed) writes never overlap flushed ones.
fn write_spec(i: u64) -> (u64, usize) {
    let len = 512 + ((i * 7919) % 70_000) as usize;
    let off = i * REGION + (i * 131) % (REGION - 71_000);
    (off, len)
}

const SIZE: u64 = 1 << 30;

fn child(path: &Path, start: u64) {
    let mut img = open(path, None, false).expect("child open");
    let mut out = std::io::stdout();
    let mut i = start;
    while (i + 1) * REGION < SIZE {
        let (off, len) = write_spec(i);
        writeln!(out, "start {i}").and_then(|_| out.flush()).expect("stdout");
        img.write_at(&data(i, len), off).expect("child write");
        if i % 3 == 2 {
            img.flush().expect("child flush");
            writeln!(out, "flushed {i}").and_then(|_| out.flush()).expect("stdout");
        }
        i += 1;
    }
    img.flush().expect("final flush");
    writeln!(out, "flushed {}", i - 1).and_then(|_| out.flush()).expect("stdout");
}

#[test]
fn crash_child_entry() {
    // Only does something when re-executed by `kill_minus_nine_leaves_consistent_image`.
    if let (Ok(path), Ok(start)) = (std::env::var("FERRO_CRASH_CHILD"), std::env::var("FERRO_CRASH_START")) {
        child(Path::new(&path), start.parse().expect("start index"));
    }
}

#[test]
fn kill_minus_nine_leaves_consistent_image() {
    let s = TempDir::new("block-crash");
    let img = s.join("crash.qcow2");
    create(&img, &CreateOptions::new(Format::Qcow2, Some(SIZE))).expect("create");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut rng = seed | 1;
    let mut next_rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Per round: the first write index and the last one the child reported flushed. Writes
    // of a round that were not covered by a flush may be lost; the others must survive.
    let mut durable: Vec<(u64, u64)> = Vec::new();
    let mut next_start = 0u64;
    let mut kills = 0;
    for round in 0..ROUNDS {
        if (next_start + 1) * REGION >= SIZE {
            break;
        }
        let mut c = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "crash_child_entry", "--nocapture", "--test-threads=1"])
            .env("FERRO_CRASH_CHILD", &img)
            .env("FERRO_CRASH_START", next_start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let delay = Duration::from_millis(5 + next_rand() % 60);
        let t0 = Instant::now();
        let stdout = c.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
        while t0.elapsed() < delay {
            if c.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if c.try_wait().expect("wait").is_none() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
            if unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) } == 0 {
                kills += 1;
            }
        }
        let _ = c.wait();
        let lines = reader.join().expect("reader");
        let round_start = next_start;
        for l in &lines {
            if let Some(n) = l.strip_prefix("flushed ") {
                let n: u64 = n.parse().expect("index");
                match durable.last_mut() {
                    Some((start, last)) if *start == round_start => *last = (*last).max(n),
                    _ => durable.push((round_start, n)),
                }
            }
            if let Some(n) = l.strip_prefix("start ") {
                next_start = next_start.max(n.parse::<u64>().expect("index") + 1);
            }
        }
        let check = qemu_img(&["check", img.to_str().expect("utf-8")]);
        let text = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
        assert!(
            matches!(check.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "round {round} (seed {seed}): qemu-img check found corruption: {text}"
        );
        let mut d = open(&img, None, true).expect("reopen after kill");
        for &(first, last) in &durable {
            for i in first..=last {
                let (off, len) = write_spec(i);
                let mut buf = vec![0u8; len];
                d.read_at(&mut buf, off).expect("read back");
                assert!(buf == data(i, len), "round {round} (seed {seed}): flushed write {i} lost");
            }
        }
    }
    assert!(kills >= 20, "only {kills} kills landed");
    assert!(durable.len() >= 5, "too few rounds flushed anything: {durable:?}");
}
