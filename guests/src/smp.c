/* smp: the boot CPU starts every application processor the MADT lists with INIT/SIPI/SIPI;
 * each AP checks in with its APIC id. Passes (exit 0) when all of them did within 10 s. */
#include "kit.h"

static volatile u32 checked_in;
static volatile u8 ap_apic_ids[64];

void guest_ap_main(u32 index) {
    if (index < 64) ap_apic_ids[index] = (u8)lapic_id();
    __atomic_fetch_add(&checked_in, 1, __ATOMIC_SEQ_CST);
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    u32 cpus = kit_madt_cpu_count(0, 0);
    lapic_enable();
    kit_printf("smp: MADT lists %u CPUs; boot CPU has APIC id %u\n", cpus, lapic_id());
    u32 asked = kit_start_aps();
    u64 start = rdtsc();
    u64 limit = 10ULL * 4000000000ULL;   /* generous: 10 s at up to 4 GHz */
    while (checked_in < asked && rdtsc() - start < limit) cpu_relax();
    for (u32 i = 1; i <= checked_in && i < 64; i++) kit_printf("smp: AP %u has APIC id %u\n", i, ap_apic_ids[i]);
    kit_printf("smp: %u of %u CPUs checked in\n", checked_in + 1, cpus);
    return checked_in == asked && asked + 1 == cpus ? 0 : 1;
}
