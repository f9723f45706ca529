//! Builds the freestanding test guests from `kit/` and `src/*.c` with the system's gcc and ld,
//! producing PVH ELF files in OUT_DIR that `lib.rs` embeds. No downloads, no prebuilt binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-O2", "-g0", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-mno-red-zone",
    "-mgeneral-regs-only", "-mno-sse", "-mno-mmx", "-mno-80387", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-tree-vectorize", "-fcf-protection=none",
    "-mcmodel=small", "-Wall", "-Wextra", "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install gcc and binutils)"));
    assert!(status.success(), "guest build step failed: {cmd:?}");
}

fn compile(src: &Path, out: &Path, kit: &Path) {
    run(Command::new("gcc").args(CFLAGS).arg("-I").arg(kit).arg("-c").arg(src).arg("-o").arg(out));
}

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kit = here.join("kit");
    println!("cargo:rerun-if-changed=kit");
    println!("cargo:rerun-if-changed=src");

    let start_o = out.join("start.o");
    compile(&kit.join("start.S"), &start_o, &kit);
    let mut kit_objs = vec![start_o];
    let mut kit_sources: Vec<PathBuf> = std::fs::read_dir(&kit)
        .expect("guests/kit")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    kit_sources.sort();
    for src in &kit_sources {
        let obj = out.join(format!("kit-{}.o", src.file_stem().unwrap().to_string_lossy()));
        compile(src, &obj, &kit);
        kit_objs.push(obj);
    }

    let mut names: Vec<String> = std::fs::read_dir(here.join("src"))
        .expect("guests/src")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".c")).map(str::to_owned))
        .collect();
    names.sort();

    let mut table = String::from("/// Every built-in test guest: (name, PVH ELF image).\npub const GUESTS: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let obj = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        compile(&here.join("src").join(format!("{name}.c")), &obj, &kit);
        run(Command::new("ld")
            .args(["-nostdlib", "-static", "--no-dynamic-linker", "-z", "noexecstack", "-z", "max-page-size=4096", "-T"])
            .arg(kit.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .args(&kit_objs)
            .arg(&obj));
        table.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", elf.display().to_string()));
    }
    table.push_str("];\n");
    std::fs::write(out.join("guests.rs"), table).unwrap();
}
