/* counter: a guest whose memory says where it is in time, for snapshot and restore tests.
 * At boot it fills 16 MiB above its image with a pattern derived from a seed (in ring 3, at
 * native speed) and prints "counter: up seed=<seed>". Each byte typed on COM1 is a command:
 *   'c'  count one more, check the whole pattern, print "counter: <n> seed=<seed> errors=<e>";
 *   'r'  take a new seed and rewrite the pattern, print "counter: reseeded seed=<seed>";
 *   'p'  print "counter: pong <n>" at once (to time how soon a restored guest answers).
 * A VM restored from a snapshot goes on counting from the snapshot's count with the snapshot's
 * seed and no errors; a reboot would say "up" again, a lost page would show as errors. */
#include "kit.h"

#define COM1 0x3f8
#define SERIAL_VECTOR 0x31
#define PATTERN_BYTES (16UL << 20)

struct pattern { u64 start, end, seed, errors, write; };
static struct pattern pattern;
static u8 user_stack[16384] __attribute__((aligned(16)));
static volatile u8 typed[64];
static volatile u32 typed_head, typed_tail;
static u64 count;

static void fill_or_check(u64 arg) {
    struct pattern *p = (struct pattern *)arg;
    volatile u64 *start = (volatile u64 *)p->start, *end = (volatile u64 *)p->end;
    if (p->write) {
        for (volatile u64 *q = start; q < end; q++) *q = (u64)q ^ p->seed;
    } else {
        for (volatile u64 *q = start; q < end; q++) if (*q != ((u64)q ^ p->seed)) p->errors++;
    }
    kit_user_return(0);
}

static void run_pattern(u64 write) {
    pattern.write = write;
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
        } else if (c == 'r') {
            pattern.seed = 0x5eed000000000000UL ^ rdtsc();
            run_pattern(1);
            kit_printf("counter: reseeded seed=%lx\n", pattern.seed);
        }
    }
}
