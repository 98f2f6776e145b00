/* An LD_PRELOAD probe for redis-server in the durability tests: every fsync/fdatasync the server makes is
 * appended to the file named by $FSYNC_LOG as "<call> <start> <end>" (CLOCK_REALTIME seconds), so that a test
 * can see whether the AOF was fsynced between sending a commit and receiving its reply. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void note(const char *call, double start, double end) {
    const char *path = getenv("FSYNC_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s %.6f %.6f\n", call, start, end);
    fclose(f);
}

int fdatasync(int fd) {
    static int (*real)(int) = 0;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    double start = now();
    int r = real(fd);
    note("fdatasync", start, now());
    return r;
}

int fsync(int fd) {
    static int (*real)(int) = 0;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    double start = now();
    int r = real(fd);
    note("fsync", start, now());
    return r;
}
