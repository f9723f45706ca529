//! How a VM may end, and what every ending leaves behind: a guest can end its VMM through the
//! debug-exit port only where that port was asked for.

use ferro_test_support::vm::{ferro, ferro_command};
use ferro_test_support::{TempDir, wait_for};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

/// The hello guest asked to leave through the debug-exit port: it decides the VMM's exit status
/// for a built-in guest and with `--debug-exit`; a kernel file without the flag finds no port
/// there, so the guest says so and halts, and the VMM keeps running until it is told to quit.
#[test]
fn the_debug_exit_port_is_opt_in() {
    let dir = TempDir::new("debug-exit");
    let hello = dir.join("hello.elf");
    assert!(ferro(&["test-guest", "write", "hello", hello.to_str().unwrap()]).status.success());
    let kernel = hello.to_str().unwrap();

    assert_eq!(ferro(&["run", "--guest", "hello", "--cmdline", "exit=3"]).status.code(), Some(7));
    assert_eq!(ferro(&["run", "--kernel", kernel, "--debug-exit", "--cmdline", "exit=3"]).status.code(), Some(7));

    let api = dir.join("api.sock");
    let mut child = ferro_command()
        .args(["vmm", "--kernel", kernel, "--cmdline", "exit=3", "--api-socket", api.to_str().unwrap()])
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
    wait_for("the control socket", Duration::from_secs(10), || api.exists());
    let mut stream = UnixStream::connect(&api).unwrap();
    stream.write_all(b"{\"op\":\"quit\"}\n").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the status is the VMM's, not the guest's");
}
