/* exceptions: the guest's own handlers run for #UD (ring 0 and ring 3), #GP (an MSR that does not
 * exist) and #PF (a missing page-table entry, which the handler fills before the access retries). */
#include "kit.h"

static volatile u32 ud_count, gp_count, pf_count;
static volatile u64 pf_cr2;
static u64 spare_pd[512] __attribute__((aligned(4096)));
static u8 user_stack[8192] __attribute__((aligned(16)));
extern u64 kit_pdpt[512];

int guest_trap(struct kit_frame *f) {
    switch (f->vector) {
    case 6: ud_count++; f->rip += 2; return 1;                   /* ud2 is 2 bytes */
    case 13: gp_count++; f->rip += 2; return 1;                  /* rdmsr is 2 bytes */
    case 14: {
        pf_cr2 = read_cr2();
        pf_count++;
        /* Map the faulting 1 GiB slot to physical 0..1 GiB with a fresh page directory. */
        for (u64 i = 0; i < 512; i++) spare_pd[i] = (i << 21) | 0x87;
        kit_pdpt[(pf_cr2 >> 30) & 511] = (u64)spare_pd | 0x7;
        write_cr3(read_cr3());
        return 1;
    }
    }
    return 0;
}

static void user_probe(u64 arg) {
    /* ring 3 reads a value the kernel left and hands it back through the ud2 return path */
    kit_user_return(*(volatile u64 *)arg + 1);
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    __asm__ volatile("ud2");
    kit_printf("exceptions: #UD handled (%u)\n", ud_count);

    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xdeadbeef));
    kit_printf("exceptions: #GP handled (%u)\n", gp_count);

    static volatile u64 marker = 0x1234567890abcdefUL;
    u64 alias = 0x4000000000UL + (u64)&marker;        /* 256 GiB up: PDPT slot 256, not present */
    u64 seen = *(volatile u64 *)alias;
    kit_printf("exceptions: #PF handled (%u) at cr2 %lx, read back %lx\n", pf_count, pf_cr2, seen);

    u64 from_user = kit_enter_user(user_probe, (u64)(user_stack + sizeof(user_stack)), (u64)&marker);
    kit_printf("exceptions: ring 3 returned %lx\n", from_user);

    int ok = ud_count == 1 && gp_count == 1 && pf_count == 1 && pf_cr2 == alias && seen == marker && from_user == marker + 1;
    kit_puts(ok ? "exceptions: all handled\n" : "exceptions: FAILED\n");
    return ok ? 0 : 1;
}
