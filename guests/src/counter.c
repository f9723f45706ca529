/* counter: a guest whose memory says where it is in time, for snapshot and restore tests.
 * At boot it fills 16 MiB above its image with a pattern derived from a seed (in ring 3, at
 * native speed) and prints "counter: up seed=<seed>". Each byte typed on COM1 is a command:
 *   'c'  count one more, check the whole pattern, print "counter: <n> seed=<seed> errors=<e>";
 *   'r'  take a new seed and rewrite the pattern, print "counter: reseeded seed=<seed>";
 *   'p'  print "counter: pong <n>" at once (to time how soon a restored guest answers);
 *   'd'  churn until the next byte arrives: pass after pass, check every word of the pattern
 *        against the generation last written and write the next generation, a short spin
 *        between passes; print "counter: churning" first and, when a byte ends it,
 *        "counter: churned passes=<p> errors=<e>" (that byte is then taken as a command).
 * A VM restored from a snapshot goes on counting from the snapshot's count with the snapshot's
 * seed and no errors; a reboot would say "up" again, a lost page would show as errors. A VM
 * migrated while churning shows a stale page (one the move left behind) as errors. */
#include "kit.h"

#define COM1 0x3f8
#define SERIAL_VECTOR 0x31
#define PATTERN_BYTES (16UL << 20)

/* mode: 0 check, 1 write, 2 check then write the next generation. */
struct pattern { u64 start, end, seed, generation, errors, mode; };
static struct pattern pattern;
static u8 user_stack[16384] __attribute__((aligned(16)));
static volatile u8 typed[64];
static volatile u32 typed_head, typed_tail;
static u64 count;

static void fill_or_check(u64 arg) {
    struct pattern *p = (struct pattern *)arg;
    volatile u64 *start = (volatile u64 *)p->start, *end = (volatile u64 *)p->end;
    u64 key = p->seed ^ p->generation;
    if (p->mode == 1) {
        for (volatile u64 *q = start; q < end; q++) *q = (u64)q ^ key;
    } else if (p->mode == 2) {
        u64 next = p->seed ^ (p->generation + 1);
        for (volatile u64 *q = start; q < end; q++) {
            if (*q != ((u64)q ^ key)) p->errors++;
            *q = (u64)q ^ next;
        }
    } else {
        for (volatile u64 *q = start; q < end; q++) if (*q != ((u64)q ^ key)) p->errors++;
    }
    kit_user_return(0);
}

static void run_pattern(u64 mode) {
    pattern.mode = mode;
    kit_enter_user(fill_or_check, (u64)(user_stack + sizeof(user_stack)), (u64)&pattern);
}

int guest_trap(struct kit_frame *f) {
    if (f->vector != SERIAL_VECTOR) return 0;
    while (inb(COM1 + 5) & 1) {                   /* LSR: data ready */
        u8 c = inb(COM1);
        if (typed_head - typed_tail < sizeof(typed)) typed[typed_head++ % sizeof(typed)] = c;
    }
    lapic_eoi();
    return 1;
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    pattern.start = ((u64)kit_image_end + 0x1fffff) & ~0x1fffffUL;
    pattern.end = pattern.start + PATTERN_BYTES;
    pattern.seed = 0x5eed000000000000UL ^ rdtsc();
    run_pattern(1);
    lapic_enable();
    ioapic_route(4, SERIAL_VECTOR, lapic_id());
    outb(COM1 + 4, 0x08);                         /* OUT2 */
    outb(COM1 + 1, 0x01);                         /* IER: received-data interrupt */
    kit_printf("counter: up seed=%lx\n", pattern.seed);
    for (;;) {
        cli();
        if (typed_head == typed_tail) { sti_hlt(); continue; }
        u8 c = typed[typed_tail++ % sizeof(typed)];
        sti();
        if (c == 'c') {
            count++;
            pattern.errors = 0;
            run_pattern(0);
            kit_printf("counter: %lu seed=%lx errors=%lu\n", count, pattern.seed, pattern.errors);
        } else if (c == 'p') {
            kit_printf("counter: pong %lu\n", count);
        } else if (c == 'd') {
            kit_printf("counter: churning\n");
            u64 passes = 0;
            pattern.errors = 0;
            while (typed_head == typed_tail) {
                run_pattern(2);
                pattern.generation++;
                passes++;
                for (u64 until = rdtsc() + (1UL << 24); rdtsc() < until && typed_head == typed_tail;) {}
            }
            kit_printf("counter: churned passes=%lu errors=%lu\n", passes, pattern.errors);
        } else if (c == 'r') {
            pattern.seed = 0x5eed000000000000UL ^ rdtsc();
            pattern.generation = 0;
            run_pattern(1);
            kit_printf("counter: reseeded seed=%lx\n", pattern.seed);
        }
    }
}
