//! Every KVM object the VMM creates can be read out and written back: vCPU state (registers,
//! segments, XSAVE, MSRs, LAPIC, MP state, events, debug registers) and VM state (PICs, IOAPIC,
//! PIT, clock) saved from one VM, restored into a second, and read again compare equal. This is
//! the path snapshot and migration build on (device states have their own unit tests).

use ferro_hypervisor::{Hypervisor, VcpuState};
use ferro_vmm::snapshot::SnapshotState;
use ferro_vmm::{SavedVm, VmBuilder};
use ferro_vmm_api::{BootConfig, Kernel, MemoryConfig, VmConfig};

fn hello_config(vcpus: u8) -> VmConfig {
    VmConfig {
        name: String::new(),
        boot: BootConfig { kernel: Kernel::TestGuest("hello".into()), initrd: None, cmdline: String::new() },
        memory: MemoryConfig::new(64 << 20),
        vcpus,
        devices: Vec::new(),
        transport: Default::default(),
        debug_exit: false,
        pinning: Default::default(),
    }
}

/// Field by field, as JSON, leaving out what keeps moving on its own: the LAPIC timer's current
/// count (offset 0x390) and the TSC MSR (0x10).
fn fields(mut s: VcpuState) -> Vec<(&'static str, String)> {
    for b in &mut s.lapic.regs[0x390..0x394] {
        *b = 0;
    }
    s.msrs.retain(|m| m.index != 0x10);
    let j = |v: &dyn erased::Json| v.json();
    vec![
        ("regs", j(&s.regs)),
        ("sregs", j(&s.sregs)),
        ("xsave", j(&s.xsave)),
        ("xcrs", j(&s.xcrs)),
        ("msrs", j(&s.msrs)),
        ("lapic", j(&s.lapic)),
        ("mp_state", j(&s.mp_state)),
        ("events", j(&s.events)),
        ("debugregs", j(&s.debugregs)),
    ]
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap()
        }
    }
}

#[test]
fn vcpu_and_vm_state_round_trip_into_a_new_vm() {
    let hv = Hypervisor::open().expect("/dev/kvm");
    let memory = std::env::temp_dir().join(format!("ferro-state-{}.mem", std::process::id()));
    let _ = std::fs::remove_file(&memory);

    // Built and never run: vCPU and VM state are read and written on the paused VM.
    let a = VmBuilder::new(&hv).boot(hello_config(2)).expect("build VM");
    a.control().vm_fd().set_irq_line(5, true).unwrap();
    let mut saved = a.control().save().unwrap();
    // Make the state distinctive so a restore that did nothing would be caught.
    saved.vcpus[0].regs.rax = 0x1122_3344_5566_7788;
    saved.vcpus[0].regs.r15 = 0xfeed_f00d;
    a.control().save_memory(&memory).unwrap();
    let cpu_features = a.control().cpu_features().clone();
    drop(a);
    // Through serde, as a snapshot file or migration stream would carry it.
    let wire = serde_json::to_vec(&saved).unwrap();
    let vm_saved = saved.kvm.clone();
    let saved: SavedVm = serde_json::from_slice(&wire).unwrap();

    let state = SnapshotState { config: hello_config(2), cpu_features, vm: saved };
    let b = VmBuilder::new(&hv).restore(state, &memory).expect("restore VM");
    let again = b.control().save().unwrap();
    assert_eq!(again.vcpus[0].regs.rax, 0x1122_3344_5566_7788);
    let saved: SavedVm = serde_json::from_slice(&wire).unwrap();
    for (state, again) in saved.vcpus.into_iter().zip(again.vcpus) {
        for ((name, before), (_, after)) in fields(state).into_iter().zip(fields(again)) {
            assert!(before == after, "vCPU {name} differs after restore");
        }
    }
    let vm_again = again.kvm;
    use erased::Json;
    assert!(vm_again.ioapic.json() == vm_saved.ioapic.json(), "IOAPIC differs after restore");
    assert!(vm_again.pic_master.json() == vm_saved.pic_master.json(), "PIC differs after restore");
    // The PIT's count_load_time is a host timestamp KVM sets at restore; the rest must match.
    let pit = |p: &ferro_hypervisor::kvm_bindings::kvm_pit_state2| -> Vec<String> {
        p.channels.iter().map(|c| format!("{} {} {} {} {}", c.count, c.mode, c.gate, c.rw_mode, c.bcd)).collect()
    };
    assert_eq!(pit(&vm_again.pit), pit(&vm_saved.pit), "PIT differs after restore");
    // The clock keeps running, but it restarted from the saved value, not from zero.
    assert!(vm_again.clock.clock >= vm_saved.clock.clock);
    drop(b);
    std::fs::remove_file(&memory).unwrap();
}
