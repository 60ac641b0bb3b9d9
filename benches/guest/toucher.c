/*
 * toucher: the guest's /init for vmm-bench's restore-ready scenario (benches/src/ready.rs).
 *
 * Touches WS_PAGES pages of its own memory (one word at the start of each 4 KiB page), round
 * after round, and counts completed rounds in a status page that the host finds in guest memory
 * by its magic words. It makes no system call at all: guest user space cannot make any on
 * kvm_pvm (it runs natively there), and none is needed to keep a working set busy.
 *
 * The host snapshots the guest while this runs. After a restore the guest is "ready" once it
 * has completed a round it began after the restore, i.e. once its whole working set is back
 * in memory. Each page must still hold the previous round's number when it is touched; a page
 * that does not (memory restored wrongly) is counted in the status page's `errors`.
 *
 * Build: gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -O2
 *        -DWS_PAGES=N -o init toucher.c
 */
#ifndef WS_PAGES
#error "define WS_PAGES, the working set in 4 KiB pages"
#endif

#define PAGE 4096UL

/* The status page. The magic is written at run time, so only this page ever carries it (the
 * executable's bytes in the initramfs do not). Layout (64-bit words): magic[4], round, pages,
 * errors; benches/src/ready.rs reads it. */
struct status {
    volatile unsigned long magic[4];
    volatile unsigned long round;
    volatile unsigned long pages;
    volatile unsigned long errors;
};

static struct status st __attribute__((aligned(4096)));
static volatile unsigned long ws[WS_PAGES][PAGE / sizeof(unsigned long)]
    __attribute__((aligned(4096)));

/* The stack the kernel hands to init is 16-byte aligned at entry, with no return address. */
__attribute__((noreturn, force_align_arg_pointer)) void _start(void)
{
    st.pages = WS_PAGES;
    st.magic[0] = 0x564d4d2d52454144UL;  /* "VMM-READ" */
    st.magic[1] = ~0x564d4d2d52454144UL;
    st.magic[2] = 0x544f554348455221UL;  /* "TOUCHER!" */
    st.magic[3] = ~0x544f554348455221UL;
    for (unsigned long round = 1;; round++) {
        for (unsigned long p = 0; p < WS_PAGES; p++) {
            if (ws[p][0] != round - 1)
                st.errors = st.errors + 1;
            ws[p][0] = round;
        }
        st.round = round;
    }
}
