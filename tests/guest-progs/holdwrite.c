/*
 * holdwrite FILE PIDFILE: holds a write to FILE in progress until killed.
 *
 * splice(2) from a pipe into a file takes the filesystem's write protection
 * (sb_start_write, fs/splice.c do_splice) and then waits for pipe data; with
 * the write end open here and never written, it waits until a signal. While it
 * waits, FIFREEZE on that filesystem waits too: the guest agent gets a freeze
 * request it cannot answer, which is what tests/tests/faults.rs needs. The pid
 * is written to PIDFILE (on a tmpfs) just before the splice.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: holdwrite FILE PIDFILE\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    int p[2];
    if (pipe(p) != 0) {
        perror("pipe");
        return 1;
    }
    FILE *pf = fopen(argv[2], "w");
    if (!pf || fprintf(pf, "%d\n", (int)getpid()) < 0 || fclose(pf) != 0) {
        perror(argv[2]);
        return 1;
    }
    ssize_t n = splice(p[0], NULL, fd, NULL, 4096, 0);
    /* Only a signal ends the wait; reaching here means the hold was not held. */
    fprintf(stderr, "holdwrite: splice returned %zd\n", n);
    return 1;
}
