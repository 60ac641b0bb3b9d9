/*
 * stamp: mutates guest memory continuously, for live-snapshot consistency tests.
 *
 * Usage: stamp MIB [EVERY [SLEEP_US]]
 *
 * Maps MIB MiB of anonymous memory and loops forever. Round c (c = 1, 2, ...) writes, in page
 * order, {MAGIC, page index, c} at the start of every 4 KiB page. Before overwriting a page it
 * checks that the page holds what round c-1 wrote: memory restored from a snapshot must agree
 * with the program's own state (its counter lives in a register or on the stack, i.e. in the
 * saved vCPU state or another page), so a torn or stale image is caught here as well as by the
 * host-side scan. On a mismatch it writes a line to /run/stamp.err and exits with status 3.
 *
 * Every EVERY rounds (default 4) it writes the round number, space padded to a fixed width, to
 * /run/stamp.count, so that the host can see it is alive. SLEEP_US (default 0) throttles it
 * between rounds.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAGIC 0x5354414d50c0ffeeULL /* "STAMP" + c0ffee; the host-side scan looks for it */
#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))

static void fail(uint64_t round, uint64_t page, const volatile uint64_t *p)
{
	char line[200];
	int fd = open("/run/stamp.err", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	int n = snprintf(line, sizeof(line),
			 "round=%llu page=%llu found magic=%llx index=%llu counter=%llu\n",
			 (unsigned long long)round, (unsigned long long)page,
			 (unsigned long long)p[0], (unsigned long long)p[1],
			 (unsigned long long)p[2]);
	if (fd >= 0 && n > 0) {
		if (write(fd, line, (size_t)n) < 0) {
			/* Nothing more to report through. */
		}
		close(fd);
	}
	exit(3);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: stamp MIB [EVERY [SLEEP_US]]\n");
		return 2;
	}
	uint64_t mib = strtoull(argv[1], NULL, 10);
	uint64_t every = argc > 2 ? strtoull(argv[2], NULL, 10) : 4;
	uint64_t sleep_us = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
	if (mib == 0 || every == 0) {
		fprintf(stderr, "stamp: MIB and EVERY must be positive\n");
		return 2;
	}
	uint64_t pages = mib * (1024 * 1024 / PAGE);
	volatile uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
				      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("stamp: mmap");
		return 1;
	}
	/* Keep the pages where they are (no swap here, but be explicit). */
	mlock((void *)mem, pages * PAGE);
	int count_fd = open("/run/stamp.count", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (count_fd < 0) {
		perror("stamp: /run/stamp.count");
		return 1;
	}
	for (uint64_t round = 1;; round++) {
		for (uint64_t i = 0; i < pages; i++) {
			volatile uint64_t *p = mem + i * WORDS;
			if (round > 1 && (p[0] != MAGIC || p[1] != i || p[2] != round - 1))
				fail(round, i, p);
			p[0] = MAGIC;
			p[1] = i;
			p[2] = round;
		}
		if (round % every == 0) {
			char buf[24];
			int n = snprintf(buf, sizeof(buf), "%20llu\n", (unsigned long long)round);
			if (pwrite(count_fd, buf, (size_t)n, 0) != n) {
				perror("stamp: write /run/stamp.count");
				return 1;
			}
		}
		if (sleep_us)
			usleep(sleep_us);
	}
}
