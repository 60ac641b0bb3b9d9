/*
 * scan: checks that a guest memory file is the image of one moment of the `stamp` program.
 *
 * Usage: scan MEMORY_FILE PAGES PREFIX
 *
 * Runs on the host of the guest (L1), not in the guest. Finds every 4 KiB page of MEMORY_FILE
 * that starts with stamp's MAGIC and reads {MAGIC, index, counter} from it. stamp writes round
 * c+1 over the pages in index order, so an image of a single moment holds every index in
 * [0, PAGES) exactly once, with counter c+1 on indices [0, k) and c on [k, PAGES) for one k
 * (k = 0: between rounds). Anything else (a missing or duplicated page, two splits, counters
 * further apart) means the image mixes moments.
 *
 * Prints PREFIX_KEY=VALUE lines: FOUND, MISSING, DUPS, BAD_INDEX, MIN, MAX, BOUNDARIES, SPLIT,
 * DETAIL and finally OK=1 or OK=0. Exits 0 when it could read the file (whatever the verdict).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAGIC 0x5354414d50c0ffeeULL /* must match stamp.c */
#define PAGE 4096UL
#define CHUNK (1024UL * 1024UL)

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: scan MEMORY_FILE PAGES PREFIX\n");
		return 2;
	}
	const char *path = argv[1];
	uint64_t pages = strtoull(argv[2], NULL, 10);
	const char *pfx = argv[3];
	if (pages == 0) {
		fprintf(stderr, "scan: PAGES must be positive\n");
		return 2;
	}
	int fd = open(path, O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "scan: open %s: %s\n", path, strerror(errno));
		return 1;
	}
	/* counter[i] == 0: index i not seen (stamp's rounds start at 1). */
	uint64_t *counter = calloc(pages, sizeof(uint64_t));
	uint64_t *where = calloc(pages, sizeof(uint64_t));
	unsigned char *buf = malloc(CHUNK);
	if (!counter || !where || !buf) {
		fprintf(stderr, "scan: out of memory\n");
		return 1;
	}
	uint64_t found = 0, dups = 0, bad_index = 0, offset = 0;
	char detail[1024] = "";
	size_t dlen = 0;
#define NOTE(...)                                                                      \
	do {                                                                           \
		if (dlen < sizeof(detail) - 100)                                       \
			dlen += (size_t)snprintf(detail + dlen, sizeof(detail) - dlen, \
						 __VA_ARGS__);                         \
	} while (0)

	for (;;) {
		size_t have = 0;
		while (have < CHUNK) {
			ssize_t n = read(fd, buf + have, CHUNK - have);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				fprintf(stderr, "scan: read %s: %s\n", path, strerror(errno));
				return 1;
			}
			if (n == 0)
				break;
			have += (size_t)n;
		}
		for (size_t at = 0; at + PAGE <= have; at += PAGE) {
			uint64_t w[3];
			memcpy(w, buf + at, sizeof(w));
			if (w[0] != MAGIC)
				continue;
			uint64_t off = offset + at;
			if (w[1] >= pages || w[2] == 0) {
				bad_index++;
				NOTE("bad page at 0x%llx (index %llu counter %llu); ",
				     (unsigned long long)off, (unsigned long long)w[1],
				     (unsigned long long)w[2]);
				continue;
			}
			if (counter[w[1]]) {
				dups++;
				NOTE("index %llu at 0x%llx (counter %llu) and 0x%llx (counter %llu); ",
				     (unsigned long long)w[1], (unsigned long long)where[w[1]],
				     (unsigned long long)counter[w[1]], (unsigned long long)off,
				     (unsigned long long)w[2]);
				continue;
			}
			counter[w[1]] = w[2];
			where[w[1]] = off;
			found++;
		}
		offset += have;
		if (have < CHUNK)
			break;
	}
	close(fd);

	uint64_t min = UINT64_MAX, max = 0, boundaries = 0, first_missing = UINT64_MAX;
	for (uint64_t i = 0; i < pages; i++) {
		if (!counter[i]) {
			if (first_missing == UINT64_MAX)
				first_missing = i;
			continue;
		}
		if (counter[i] < min)
			min = counter[i];
		if (counter[i] > max)
			max = counter[i];
		if (i > 0 && counter[i - 1] && counter[i] != counter[i - 1]) {
			boundaries++;
			NOTE("index %llu: %llu -> %llu; ", (unsigned long long)i,
			     (unsigned long long)counter[i - 1], (unsigned long long)counter[i]);
		}
	}
	uint64_t missing = pages - found;
	if (missing)
		NOTE("first missing index %llu; ", (unsigned long long)first_missing);
	if (!found)
		min = 0;
	/* The split: the number of leading pages already at the newer counter. */
	uint64_t split = 0;
	if (found && max == min + 1)
		while (split < pages && counter[split] == max)
			split++;
	int ok = found == pages && dups == 0 && bad_index == 0 &&
		 (max == min || (max == min + 1 && boundaries == 1 && counter[0] == max));

	printf("%s_FOUND=%llu\n", pfx, (unsigned long long)found);
	printf("%s_MISSING=%llu\n", pfx, (unsigned long long)missing);
	printf("%s_DUPS=%llu\n", pfx, (unsigned long long)dups);
	printf("%s_BAD_INDEX=%llu\n", pfx, (unsigned long long)bad_index);
	printf("%s_MIN=%llu\n", pfx, (unsigned long long)min);
	printf("%s_MAX=%llu\n", pfx, (unsigned long long)max);
	printf("%s_BOUNDARIES=%llu\n", pfx, (unsigned long long)boundaries);
	printf("%s_SPLIT=%llu\n", pfx, (unsigned long long)split);
	printf("%s_DETAIL=%s\n", pfx, dlen ? detail : "none");
	printf("%s_OK=%d\n", pfx, ok);
	return 0;
}
