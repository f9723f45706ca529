/* memory: in ring 3 (native speed on kvm-pvm), writes a pattern over every RAM range the memory
 * map reports above the guest image and reads it back. Reports MiB verified and errors. With
 * `hold=1` on the command line it then waits for interrupts instead of exiting, so that the host
 * can look at the VM while all of its RAM is in use. */
#include "kit.h"

struct range { u64 start, end, seed, errors, bytes; };
static struct range ranges[16];
static u8 user_stack[16384] __attribute__((aligned(16)));

static void fill_and_check(u64 arg) {
    struct range *r = (struct range *)arg;
    for (; r->end; r++) {
        volatile u64 *p = (volatile u64 *)r->start, *end = (volatile u64 *)r->end;
        for (volatile u64 *q = p; q < end; q++) *q = (u64)q ^ r->seed;
        for (volatile u64 *q = p; q < end; q++) if (*q != ((u64)q ^ r->seed)) r->errors++;
        r->bytes = r->end - r->start;
    }
    kit_user_return(0);
}

int guest_main(struct hvm_start_info *si) {
    if (!si || !si->memmap_paddr) { kit_puts("memory: no memory map\n"); return 1; }
    struct hvm_memmap_entry *m = (struct hvm_memmap_entry *)si->memmap_paddr;
    u64 floor = ((u64)kit_image_end + 0x1fffff) & ~0x1fffffUL;
    u32 n = 0;
    for (u32 i = 0; i < si->memmap_entries && n < 15; i++) {
        if (m[i].type != 1) continue;
        u64 start = m[i].addr < floor ? floor : m[i].addr;
        u64 end = m[i].addr + m[i].size;
        if (end > 0x100000000UL) end = 0x100000000UL;   /* the kit maps the first 4 GiB */
        if (end <= start) continue;
        ranges[n].start = start;
        ranges[n].end = end;
        ranges[n].seed = 0x5a5a5a5a00000000UL + rdtsc();
        n++;
    }
    ranges[n].end = 0;
    kit_enter_user(fill_and_check, (u64)(user_stack + sizeof(user_stack)), (u64)ranges);
    u64 bytes = 0, errors = 0;
    for (u32 i = 0; i < n; i++) { bytes += ranges[i].bytes; errors += ranges[i].errors; }
    kit_printf("memory: verified %lu MiB in ring 3 with %lu errors\n", bytes >> 20, errors);
    u64 hold = 0;
    if (kit_cmdline_u64("hold", &hold) && hold) {
        kit_puts("memory: holding\n");
        for (;;) sti_hlt();
    }
    return (errors == 0 && bytes > 0) ? 0 : 1;
}
