//! `ferro run` on the real /dev/kvm with the built-in test guests: what each guest reports on
//! its console and the exit status it ends with.

use ferro_test_support::vm::{ferro, ferro_command, read_until, stderr, stdout};
use ferro_test_support::{TempDir, wait_exit};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn hello_prints_and_powers_off() {
    let o = ferro(&["run", "--guest", "hello", "--cmdline", "console=ttyS0 quiet"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Hello from the Ferrovisor test guest!"), "{out}");
    assert!(out.contains("cmdline: console=ttyS0 quiet"), "{out}");
}

#[test]
fn hello_is_the_default_guest() {
    let o = ferro(&["run"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("Hello from the Ferrovisor test guest!"));
}

#[test]
fn debug_exit_status_is_value_shifted_with_low_bit() {
    for (value, status) in [(0, 1), (3, 7), (21, 43)] {
        let o = ferro(&["run", "--guest", "hello", "--cmdline", &format!("exit={value}")]);
        assert_eq!(o.status.code(), Some(status), "exit={value}: {}", stderr(&o));
    }
}

#[test]
fn smp_every_vcpu_checks_in() {
    for cpus in [1, 2, 4] {
        let o = ferro(&["run", "--guest", "smp", "--cpus", &cpus.to_string()]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(0), "{cpus} CPUs: {out}{}", stderr(&o));
        assert!(out.contains(&format!("smp: {cpus} of {cpus} CPUs checked in")), "{out}");
        for ap in 1..cpus {
            assert!(out.contains(&format!("smp: AP {ap} has APIC id")), "{out}");
        }
    }
}

#[test]
fn timer_and_ioapic_interrupts_arrive() {
    let o = ferro(&["run", "--guest", "timer"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("timer: 10 LAPIC ticks"), "{out}");
    assert!(out.contains("timer: 1 serial interrupts through IOAPIC pin 4"), "{out}");
}

#[test]
fn memory_pattern_over_all_ram_from_ring3() {
    let o = ferro(&["run", "--guest", "memory", "--memory", "64M"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    // 64 MiB minus the 4 MiB below the first 2 MiB boundary past the image.
    assert!(out.contains("memory: verified 60 MiB in ring 3 with 0 errors"), "{out}");
}

#[test]
fn guest_exception_handlers_run() {
    let o = ferro(&["run", "--guest", "exceptions"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("exceptions: all handled"), "{out}");
    assert!(out.contains("cr2 4000"), "{out}");
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = ferro_command()
            .args(["run", "--guest", "idle", "--cpus", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        read_until(&mut out, &mut String::new(), "idle: up");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = wait_exit(&mut child, Duration::from_secs(5)).expect("ferro did not stop on the signal");
        assert_eq!(status.code(), Some(0), "signal {sig}");
    }
}

#[test]
fn bad_inputs_get_one_clear_line_and_nonzero_status() {
    let dir = TempDir::new("bad-inputs");
    let text = dir.join("notakernel");
    std::fs::write(&text, "just some text, definitely not a kernel\n".repeat(20)).unwrap();
    let big = dir.join("big.img");
    std::fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
    let hello = dir.join("hello.elf");
    assert!(ferro(&["test-guest", "write", "hello", hello.to_str().unwrap()]).status.success());
    let long = "x".repeat(3000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux"),
        (vec!["run", "--kernel", text.to_str().unwrap()], "not a kernel"),
        (vec!["run", "--kernel", hello.to_str().unwrap(), "--memory", "32M", "--initrd", big.to_str().unwrap()], "does not fit"),
        (vec!["run", "--memory", "64T"], "more than this host has"),
        (vec!["run", "--memory", "1M"], "too small"),
        (vec!["run", "--memory", "12Q"], "suffix"),
        (vec!["run", "--cpus", "0"], "vCPUs requested"),
        (vec!["run", "--cpus", "300"], "300"),
        (vec!["run", "--cmdline", &long], "command line is 3000 bytes"),
        (vec!["run", "--guest", "nosuch"], "no built-in guest named 'nosuch'"),
    ];
    for (args, expect) in cases {
        let o = ferro(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_ne!(o.status.code(), None, "{args:?} died from a signal");
        assert!(err.contains(expect), "{args:?}: stderr {err:?} lacks {expect:?}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn elf32_with_a_pvh_note_boots_like_qemu_accepts_it() {
    let dir = TempDir::new("elf32");
    let (e64, e32) = (dir.join("hello64.elf"), dir.join("hello32.elf"));
    assert!(ferro(&["test-guest", "write", "hello", e64.to_str().unwrap()]).status.success());
    let conv = Command::new("objcopy").args(["-O", "elf32-i386"]).arg(&e64).arg(&e32).status().expect("objcopy (binutils)");
    assert!(conv.success());
    let o = ferro(&["run", "--kernel", e32.to_str().unwrap(), "--debug-exit", "--cmdline", "exit=5"]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    assert!(stdout(&o).contains("Hello from the Ferrovisor test guest!"));
    // A 32-bit ELF whose segment lies beyond guest memory is refused, not loaded.
    let mut bytes = std::fs::read(&e32).unwrap();
    let phoff = u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as usize;
    bytes[phoff + 12..phoff + 16].copy_from_slice(&0xf000_0000u32.to_le_bytes()); // first p_paddr
    std::fs::write(&e32, &bytes).unwrap();
    let o = ferro(&["run", "--kernel", e32.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("does not fit in guest memory"), "{}", stderr(&o));
}

/// The interactive console on a real terminal (a pty): typed bytes reach the guest, Ctrl-A x
/// quits, and the terminal's settings are restored afterwards.
#[test]
fn terminal_console_input_escape_and_restore() {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the integers we own; the other arguments may be null.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty");
    let termios = |fd| {
        // SAFETY: termios is plain data filled by tcgetattr on a valid terminal fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        (t.c_lflag, t.c_iflag, t.c_oflag)
    };
    let before = termios(slave);
    // SAFETY: each File takes ownership of its own dup of the slave fd.
    let (sin, sout) = unsafe { (std::fs::File::from_raw_fd(libc::dup(slave)), std::fs::File::from_raw_fd(libc::dup(slave))) };
    let mut child = ferro_command()
        .args(["run", "--guest", "idle"])
        .stdin(Stdio::from(sin))
        .stdout(Stdio::from(sout))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SAFETY: the master fd is ours alone from here on.
    let mut m = unsafe { std::fs::File::from_raw_fd(master) };
    let mut seen = String::new();
    read_until(&mut m, &mut seen, "idle: up");
    use std::io::Write;
    m.write_all(b"k").unwrap();
    read_until(&mut m, &mut seen, "echo: k");
    m.write_all(b"\x01x").unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(5)).expect("Ctrl-A x did not quit");
    assert_eq!(status.code(), Some(0));
    assert_eq!(termios(slave), before, "terminal settings not restored");
    // SAFETY: closing the slave fd we opened.
    unsafe { libc::close(slave) };
}
