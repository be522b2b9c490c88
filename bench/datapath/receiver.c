/* receiver.c: drains the worker sockets for bench/datapath (compiled by run.py with gcc).
 *
 * Why: the delivered packet count must not be limited by the reader. One busy-polling
 * process drains every inherited socket with recvmmsg(MSG_DONTWAIT), 64 datagrams per
 * call, and prints the count per socket when DURATION seconds are over. run.py also reads
 * the UDP receive-buffer error counter to show whether the reader kept up.
 *
 * usage: receiver DURATION FD...
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define MAX_FDS 64

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    static char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    unsigned long long counts[MAX_FDS] = {0};
    int fds[MAX_FDS];
    int n = argc - 2;

    if (argc < 3 || n > MAX_FDS) {
        fprintf(stderr, "usage: %s DURATION FD...\n", argv[0]);
        return 2;
    }
    for (int i = 0; i < n; i++)
        fds[i] = atoi(argv[i + 2]);
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof(bufs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    double deadline = now() + atof(argv[1]);
    while (now() < deadline) {
        for (int i = 0; i < n; i++) {
            int r;

            while ((r = recvmmsg(fds[i], msgs, BATCH, MSG_DONTWAIT, NULL)) > 0)
                counts[i] += r;
        }
    }
    for (int i = 0; i < n; i++)
        printf("%s%llu", i ? " " : "", counts[i]);
    printf("\n");
    return 0;
}
