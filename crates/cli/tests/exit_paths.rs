//! How a VM may end, and what every ending leaves behind: a guest can end its VMM through the
//! debug-exit port only where that port was asked for.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ferro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferro")).args(args).stdin(Stdio::null()).output().expect("run ferro")
}

fn wait_for_socket(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The hello guest asked to leave through the debug-exit port: it decides the VMM's exit status
/// for a built-in guest and with `--debug-exit`; a kernel file without the flag finds no port
/// there, so the guest says so and halts, and the VMM keeps running until it is told to quit.
#[test]
fn the_debug_exit_port_is_opt_in() {
    let dir = std::env::temp_dir().join(format!("ferro-debug-exit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hello = dir.join("hello.elf");
    assert!(ferro(&["test-guest", "write", "hello", hello.to_str().unwrap()]).status.success());
    let kernel = hello.to_str().unwrap();

    assert_eq!(ferro(&["run", "--guest", "hello", "--cmdline", "exit=3"]).status.code(), Some(7));
    assert_eq!(ferro(&["run", "--kernel", kernel, "--debug-exit", "--cmdline", "exit=3"]).status.code(), Some(7));

    let api = dir.join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(["vmm", "--kernel", kernel, "--cmdline", "exit=3", "--api-socket", api.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let console = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    for line in console.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("debug-exit 3 had no effect") {
            break;
        }
    }
    assert!(seen.contains("debug-exit 3 had no effect"), "the VMM ended on the guest's word:\n{seen}");
    wait_for_socket(&api);
    let mut stream = UnixStream::connect(&api).unwrap();
    stream.write_all(b"{\"op\":\"quit\"}\n").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the status is the VMM's, not the guest's");
    std::fs::remove_dir_all(&dir).unwrap();
}
