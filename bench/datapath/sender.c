/* sender.c: UDP load generator for bench/datapath (compiled by run.py with gcc).
 *
 * Why C and sendmmsg: the benchmark measures the kernel's receive path (reuseport lookup,
 * steering program, XDP guard), so the sender must be cheap per packet; a Python loop
 * would be what gets measured. Sends pre-built QUIC payloads from a template file, round
 * robin over NSOCK connected sockets (distinct source ports), 64 datagrams per syscall,
 * for DURATION seconds; prints the number of datagrams the kernel accepted, the failed
 * calls, and the CPU time of its send loop in ns (CLOCK_PROCESS_CPUTIME_ID is the
 * scheduler's precise runtime, which includes the softirq work the kernel runs in this
 * task's context, i.e. the whole receive path of the packets it sends over veth).
 *
 * With SRC_PORT, socket i is bound to source port SRC_PORT + i before it connects (run.py's
 * learned-peer mode pre-inserts those client ports into learned_peers); without, or 0, the
 * kernel picks ephemeral ports.
 *
 * usage: sender DST PORT DURATION NSOCK TEMPLATES PKT_SIZE [SRC_PORT]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>

#include "sockaddr.h"
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SOCKS 64

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s DST PORT DURATION NSOCK TEMPLATES PKT_SIZE [SRC_PORT]\n",
                argv[0]);
        return 2;
    }
    const char *dst = argv[1];
    int port = atoi(argv[2]);
    double duration = atof(argv[3]);
    int nsock = atoi(argv[4]);
    size_t size = (size_t)atol(argv[6]);
    int src_port = argc == 8 ? atoi(argv[7]) : 0;
    FILE *f = fopen(argv[5], "rb");
    static char templates[1 << 20];
    size_t total = f ? fread(templates, 1, sizeof(templates), f) : 0;
    size_t ntemplates = size ? total / size : 0;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int socks[MAX_SOCKS];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    unsigned long long sent = 0, failed = 0;
    size_t next = 0;

    if (!f || ntemplates == 0 || nsock < 1 || nsock > MAX_SOCKS) {
        fprintf(stderr, "bad templates or NSOCK\n");
        return 2;
    }
    fclose(f);
    addrlen = bench_sockaddr(dst, port, &addr);
    if (!addrlen) {
        fprintf(stderr, "bad address %s\n", dst);
        return 2;
    }
    for (int i = 0; i < nsock; i++) {
        struct sockaddr_storage local;

        socks[i] = socket(addr.ss_family, SOCK_DGRAM, 0);
        if (socks[i] >= 0 && src_port > 0) {
            socklen_t locallen = bench_sockaddr(addr.ss_family == AF_INET6 ? "::" : "0.0.0.0",
                                                src_port + i, &local);

            if (bind(socks[i], (struct sockaddr *)&local, locallen) < 0) {
                perror("bind");
                return 1;
            }
        }
        if (socks[i] < 0 || connect(socks[i], (struct sockaddr *)&addr, addrlen) < 0) {
            perror("socket/connect");
            return 1;
        }
    }
    memset(msgs, 0, sizeof(msgs));
    struct timespec cpu0, cpu1;

    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0);
    double deadline = now() + duration;
    for (int s = 0; now() < deadline; s = (s + 1) % nsock) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = templates + next * size;
            iov[i].iov_len = size;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            next = (next + 1) % ntemplates;
        }
        int r = sendmmsg(socks[s], msgs, BATCH, 0);
        if (r > 0)
            sent += r;
        else
            failed++;
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu1);
    printf("%llu %llu %lld\n", sent, failed,
           (long long)(cpu1.tv_sec - cpu0.tv_sec) * 1000000000LL + (cpu1.tv_nsec - cpu0.tv_nsec));
    return 0;
}
