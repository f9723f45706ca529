//! `ferro-bench jail`: what the jail and the seccomp filters cost a domain's VMM, against a ferrod
//! that runs VMMs plain (`--no-jail --no-seccomp`) in the same run. Two figures: the start-to-exit
//! round trip of a guest that powers off at once (`ferro start` until the domain is shut off:
//! jail setup, exec, filter compilation, VM build, teardown), and the cost of one PIO exit round
//! trip (every exit is a KVM_RUN ioctl through the vCPU's filter), from guests making N exits
//! against none. Runs alternate between the two ferrods so drift hits both alike.

use crate::common::median;
use ferro_test_support::daemon::{Daemon, Home};
use std::time::{Duration, Instant};

const EXITS: u32 = 200_000;

/// Starts domain `name` and waits until it is shut off again; the seconds it took.
fn start_to_exit(d: &Daemon, name: &str) -> f64 {
    let api = d.api();
    let t = Instant::now();
    api.expect("POST", &format!("/v1/domains/{name}/start"), None, 200);
    loop {
        let info = api.expect("GET", &format!("/v1/domains/{name}"), None, 200);
        match info["state"].as_str() {
            Some("shutoff") => return t.elapsed().as_secs_f64(),
            Some("running") => std::thread::sleep(Duration::from_millis(1)),
            _ => panic!("domain {name} did not end well: {info}"),
        }
        assert!(t.elapsed() < Duration::from_secs(60), "domain {name} still runs after a minute");
    }
}

pub fn run(runs: usize) {
    let (jailed_home, plain_home) = (Home::new("bench-jailed"), Home::new("bench-plain"));
    let jailed = Daemon::start(&jailed_home);
    let plain = Daemon::start_args(&plain_home, &["--no-jail", "--no-seccomp"], &[]);
    for d in [&jailed, &plain] {
        for (name, cmdline) in [("quick", "pio=0 mmio=0".to_string()), ("exits", format!("pio={EXITS}"))] {
            let toml = format!("name = \"{name}\"\nmemory = \"64M\"\n[boot]\nguest = \"exitbench\"\ncmdline = \"{cmdline}\"\n");
            d.api().expect("POST", "/v1/domains", Some(&toml), 201);
        }
    }
    println!("== jail + seccomp against plain VMMs (--no-jail --no-seccomp), {runs} interleaved runs, medians");
    let (mut quick, mut exits) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..runs {
        for (i, d) in [&jailed, &plain].into_iter().enumerate() {
            let q = start_to_exit(d, "quick");
            quick[i].push(q);
            exits[i].push((start_to_exit(d, "exits") - q) / f64::from(EXITS) * 1e6);
        }
    }
    let [quick_jailed, quick_plain] = quick.map(median);
    let [exit_jailed, exit_plain] = exits.map(median);
    println!("  start to exit (guest powers off at once)   jailed {:7.1} ms   plain {:7.1} ms   ratio {:.2}", quick_jailed * 1e3, quick_plain * 1e3, quick_jailed / quick_plain);
    println!("  PIO exit round trip ({EXITS} exits)      jailed {exit_jailed:7.2} us   plain {exit_plain:7.2} us   ratio {:.2}", exit_jailed / exit_plain);
}
