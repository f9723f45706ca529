/* Test-guest kit: what a test guest may call. Ring-0 code here uses integer instructions only
 * (built with -mgeneral-regs-only); heavy or SIMD work belongs in ring 3 (kit_enter_user). */
#ifndef KIT_H
#define KIT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

/* hvm_start_info (Xen PVH ABI), as the VMM (or QEMU) hands it over in %ebx. */
struct hvm_start_info {
    u32 magic;              /* 0x336ec578 */
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};
struct hvm_memmap_entry { u64 addr; u64 size; u32 type; u32 reserved; };
#define HVM_START_MAGIC 0x336ec578

/* Registers saved by the interrupt entry, then what the CPU pushed. */
struct kit_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

/* Provided by each guest. Return value: the debug-exit value (0 = pass). */
int guest_main(struct hvm_start_info *si);
/* Optional, weak: runs on each application processor (index 1..n). */
void guest_ap_main(u32 index);
/* Optional, weak: interrupt/exception hook; return 1 when handled. */
int guest_trap(struct kit_frame *f);

/* Port I/O, MSRs, control registers. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo; }
static inline void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Console and verdicts. */
void kit_putc(char c);
void kit_puts(const char *s);
void kit_printf(const char *fmt, ...);      /* %s %c %d %u %x %lx %lu %ld %p */
void kit_exit(u32 value) __attribute__((noreturn));   /* isa-debug-exit: status (value<<1)|1 */
void kit_poweroff(void) __attribute__((noreturn));    /* ACPI S5 through the FADT's sleep register */

/* Strings and memory (byte/qword loops; no SIMD). */
u64 kit_strlen(const char *s);
int kit_strncmp(const char *a, const char *b, u64 n);
const char *kit_cmdline(void);                /* "" when none */
int kit_cmdline_u64(const char *key, u64 *out); /* finds key=NUMBER; 1 if found */
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

/* ACPI: find a table by signature through the RSDP/XSDT the VMM provided. */
void *kit_acpi_table(const char sig[4]);
u32 kit_madt_cpu_count(u8 *apic_ids, u32 max);

/* LAPIC (xAPIC MMIO) and IOAPIC. */
#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
void lapic_enable(void);
void lapic_eoi(void);
u32 lapic_id(void);
void lapic_send_ipi(u32 apic_id, u32 icr_low);
void ioapic_route(u32 pin, u8 vector, u32 dest_apic);

/* SMP: start every AP the MADT lists (INIT, SIPI, SIPI); returns how many were asked to start. */
u32 kit_start_aps(void);
extern volatile u32 ap_next_index;

/* Ring 3: runs fn(arg) on user_stack; fn must end with kit_user_return(value) (a ud2). */
u64 kit_enter_user(void (*fn)(u64), u64 user_stack_top, u64 arg);
static inline __attribute__((noreturn)) void kit_user_return(u64 value) {
    __asm__ volatile("ud2" :: "a"(value));
    __builtin_unreachable();
}

extern struct hvm_start_info *kit_start_info;
extern char kit_image_end[];

#endif
