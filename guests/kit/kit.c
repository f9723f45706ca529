/* Test-guest kit: console, verdicts, ACPI lookup, LAPIC/IOAPIC, AP start-up and trap dispatch. */
#include "kit.h"
#include "layout.h"
#include <stdarg.h>

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4

struct hvm_start_info *kit_start_info;
void kit_leave_user(u64 value) __attribute__((noreturn));

/* ---- memory and strings ---- */
void *memset(void *d, int c, u64 n) {
    void *ret = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}
void *memcpy(void *d, const void *s, u64 n) {
    void *ret = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return ret;
}
u64 kit_strlen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
int kit_strncmp(const char *a, const char *b, u64 n) {
    for (u64 i = 0; i < n; i++) {
        if (a[i] != b[i]) return (u8)a[i] - (u8)b[i];
        if (!a[i]) return 0;
    }
    return 0;
}

/* ---- console ---- */
void kit_putc(char c) { outb(COM1, (u8)c); }
void kit_puts(const char *s) { while (*s) kit_putc(*s++); }

static void put_unsigned(u64 v, unsigned base, int width) {
    char buf[24];
    int n = 0;
    do { buf[n++] = "0123456789abcdef"[v % base]; v /= base; } while (v);
    while (n < width) buf[n++] = '0';
    while (n) kit_putc(buf[--n]);
}

void kit_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') { kit_putc(*fmt); continue; }
        fmt++;
        int is_long = 0;
        if (*fmt == 'l') { is_long = 1; fmt++; }
        switch (*fmt) {
        case 's': kit_puts(va_arg(ap, const char *)); break;
        case 'c': kit_putc((char)va_arg(ap, int)); break;
        case 'u': put_unsigned(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0); break;
        case 'x': put_unsigned(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0); break;
        case 'p': kit_puts("0x"); put_unsigned((u64)va_arg(ap, void *), 16, 0); break;
        case 'd': {
            i64 v = is_long ? va_arg(ap, i64) : va_arg(ap, int);
            if (v < 0) { kit_putc('-'); v = -v; }
            put_unsigned((u64)v, 10, 0);
            break;
        }
        case '%': kit_putc('%'); break;
        default: kit_putc('?'); break;
        }
    }
    va_end(ap);
}

void kit_exit(u32 value) {
    outl(DEBUG_EXIT_PORT, value);
    /* Still here: the VMM has no debug-exit port (it is opt-in); say so and stop. */
    kit_printf("kit: debug-exit %u had no effect, halting\n", value);
    for (;;) { cli(); __asm__ volatile("hlt"); }
}

/* ---- command line ---- */
const char *kit_cmdline(void) {
    if (!kit_start_info || !kit_start_info->cmdline_paddr) return "";
    return (const char *)kit_start_info->cmdline_paddr;
}

int kit_cmdline_u64(const char *key, u64 *out) {
    const char *s = kit_cmdline();
    u64 klen = kit_strlen(key);
    for (; *s; s++) {
        if ((s == kit_cmdline() || s[-1] == ' ') && !kit_strncmp(s, key, klen) && s[klen] == '=') {
            const char *p = s + klen + 1;
            u64 v = 0;
            unsigned base = 10;
            if (p[0] == '0' && p[1] == 'x') { base = 16; p += 2; }
            for (;; p++) {
                unsigned d;
                if (*p >= '0' && *p <= '9') d = (unsigned)(*p - '0');
                else if (base == 16 && *p >= 'a' && *p <= 'f') d = (unsigned)(*p - 'a' + 10);
                else break;
                v = v * base + d;
            }
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* ---- ACPI ---- */
struct acpi_header { char sig[4]; u32 length; u8 revision, checksum; char oem[6]; char table[8]; u32 oem_rev, creator, creator_rev; } __attribute__((packed));

void *kit_acpi_table(const char sig[4]) {
    if (!kit_start_info || !kit_start_info->rsdp_paddr) return 0;
    const u8 *rsdp = (const u8 *)kit_start_info->rsdp_paddr;
    if (kit_strncmp((const char *)rsdp, "RSD PTR ", 8)) return 0;
    u64 xsdt_addr = *(const u64 *)(rsdp + 24);
    const struct acpi_header *xsdt = (const struct acpi_header *)xsdt_addr;
    if (!xsdt_addr || kit_strncmp(xsdt->sig, "XSDT", 4)) return 0;
    u32 n = (xsdt->length - sizeof(*xsdt)) / 8;
    const u8 *entries = (const u8 *)(xsdt + 1);
    for (u32 i = 0; i < n; i++) {
        u64 addr;
        memcpy(&addr, entries + i * 8, 8);
        const struct acpi_header *t = (const struct acpi_header *)addr;
        if (!kit_strncmp(t->sig, sig, 4)) return (void *)t;
    }
    return 0;
}

u32 kit_madt_cpu_count(u8 *apic_ids, u32 max) {
    const struct acpi_header *madt = kit_acpi_table("APIC");
    if (!madt) return 1;
    const u8 *p = (const u8 *)madt + sizeof(*madt) + 8;
    const u8 *end = (const u8 *)madt + madt->length;
    u32 n = 0;
    while (p + 2 <= end && p[1] >= 2) {
        if (p[0] == 0 && (p[4] & 1)) {   /* processor local APIC, enabled */
            if (n < max && apic_ids) apic_ids[n] = p[3];
            n++;
        }
        p += p[1];
    }
    return n;
}

void kit_poweroff(void) {
    const u8 *fadt = kit_acpi_table("FACP");
    if (fadt && ((const struct acpi_header *)fadt)->length >= 256) {
        /* FADT sleep control register: a Generic Address Structure at offset 244. */
        u8 space = fadt[244];
        u64 addr;
        memcpy(&addr, fadt + 248, 8);
        u8 value = (5 << 2) | (1 << 5);   /* SLP_TYP = S5, SLP_EN */
        if (space == 1) outb((u16)addr, value);
        else if (space == 0) *(volatile u8 *)addr = value;
    }
    kit_puts("kit: poweroff through ACPI failed\n");
    kit_exit(0x7f);
}

/* ---- LAPIC / IOAPIC ---- */
void lapic_enable(void) {
    /* Mask both 8259 PICs: KVM wires ISA lines to them too, and an unprogrammed PIC would
     * deliver IRQ n as vector n through LINT0. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write32(LAPIC_BASE + 0xf0, 0x1ff);
}
void lapic_eoi(void) { mmio_write32(LAPIC_BASE + 0xb0, 0); }
u32 lapic_id(void) { return mmio_read32(LAPIC_BASE + 0x20) >> 24; }
void lapic_send_ipi(u32 apic_id, u32 icr_low) {
    mmio_write32(LAPIC_BASE + 0x310, apic_id << 24);
    mmio_write32(LAPIC_BASE + 0x300, icr_low);
    while (mmio_read32(LAPIC_BASE + 0x300) & (1 << 12)) cpu_relax();
}
void ioapic_route(u32 pin, u8 vector, u32 dest_apic) {
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin + 1);
    mmio_write32(IOAPIC_BASE + 0x10, dest_apic << 24);
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
    mmio_write32(IOAPIC_BASE + 0x10, vector);          /* fixed, physical, edge, active high, unmasked */
}

/* ---- SMP ---- */
u32 kit_start_aps(void) {
    u8 ids[64];
    u32 n = kit_madt_cpu_count(ids, 64);
    if (n > 64) n = 64;
    u32 me = lapic_id();
    u32 started = 0;
    for (u32 i = 0; i < n; i++) {
        if (ids[i] == me) continue;
        lapic_send_ipi(ids[i], 0x4500);                           /* INIT, assert */
        lapic_send_ipi(ids[i], 0x4600 | (KIT_AP_TRAMP >> 12));    /* SIPI */
        lapic_send_ipi(ids[i], 0x4600 | (KIT_AP_TRAMP >> 12));    /* SIPI again, as the MP spec says */
        started++;
    }
    return started;
}

__attribute__((weak)) void guest_ap_main(u32 index) { (void)index; }
__attribute__((weak)) int guest_trap(struct kit_frame *f) { (void)f; return 0; }

void kit_ap_main(u32 index) {
    guest_ap_main(index + 1);
    for (;;) sti_hlt();
}

/* ---- traps ---- */
void kit_trap(struct kit_frame *f) {
    if (f->vector == 6 && (f->cs & 3) == 3) kit_leave_user(f->rax);   /* ring-3 "return" */
    if (guest_trap(f)) return;
    kit_printf("kit: unexpected trap vector %lu error %lx at rip %lx cs %lx cr2 %lx\n",
               f->vector, f->error, f->rip, f->cs, read_cr2());
    kit_exit(0x7e);
}

void kit_main(struct hvm_start_info *si) {
    kit_start_info = (si && si->magic == HVM_START_MAGIC) ? si : 0;
    int rc = guest_main(kit_start_info);
    /* Pass: power off (exit status 0 under Ferrovisor and QEMU alike). Fail: debug-exit with
     * the guest's code, so the status is (rc << 1) | 1. */
    if (rc == 0) kit_poweroff();
    kit_exit((u32)rc);
}
