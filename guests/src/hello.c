/* hello: prints a greeting and the command line, then ends the VM.
 * `exit=N` on the command line ends through the debug-exit port (process status (N<<1)|1);
 * without it the guest powers off through ACPI (status 0). */
#include "kit.h"

int guest_main(struct hvm_start_info *si) {
    kit_puts("Hello from the Ferrovisor test guest!\n");
    kit_printf("cmdline: %s\n", kit_cmdline());
    u64 status;
    if (kit_cmdline_u64("exit", &status)) kit_exit((u32)status);
    (void)si;
    kit_poweroff();
}
