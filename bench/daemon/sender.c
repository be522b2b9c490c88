/* sender.c: replays pre-made QUIC first flights for bench/daemon.py (built with gcc at run time).
 *
 * Why C: the benchmark measures how many new first flights the daemon classifies and
 * re-injects, and the latency it adds; a Python sender would cost more per flight than the
 * thing measured, and its timestamps would carry its own jitter. Same approach as
 * bench/datapath/sender.c (connected sockets, sendmmsg), plus what this benchmark needs:
 * open-loop pacing to a target rate (clock_nanosleep on an absolute schedule, so a late
 * batch does not slow the offered load down) and a CLOCK_MONOTONIC send time per flight,
 * written to a file that the orchestrator matches with the receiver's arrival times.
 *
 * Flights are fixed-size records in FLIGHTS; records [LO, HI) are sent once each, in
 * order, BATCH per sendmmsg, round robin over NSOCK sockets (distinct source ports).
 * RATE is flights per second, 0 for as fast as the kernel takes them.
 *
 * usage: sender DST PORT FLIGHTS RECSIZE LO HI RATE BATCH NSOCK OUT
 * prints: "sent failed elapsed_seconds"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>

#include "sockaddr.h"
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256
#define MAX_SOCKS 256

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
    struct timespec ts = { .tv_sec = t / 1000000000, .tv_nsec = t % 1000000000 };

    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

int main(int argc, char **argv)
{
    if (argc != 11) {
        fprintf(stderr, "usage: %s DST PORT FLIGHTS RECSIZE LO HI RATE BATCH NSOCK OUT\n",
                argv[0]);
        return 2;
    }
    const char *dst = argv[1];
    int port = atoi(argv[2]);
    size_t recsize = (size_t)atol(argv[4]);
    long lo = atol(argv[5]), hi = atol(argv[6]);
    double rate = atof(argv[7]);
    int batch = atoi(argv[8]), nsock = atoi(argv[9]);
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int socks[MAX_SOCKS];
    static struct mmsghdr msgs[MAX_BATCH];
    static struct iovec iov[MAX_BATCH];
    unsigned long long sent = 0, failed = 0;

    if (batch < 1 || batch > MAX_BATCH || nsock < 1 || nsock > MAX_SOCKS || lo < 0 || hi <= lo) {
        fprintf(stderr, "bad BATCH, NSOCK or range\n");
        return 2;
    }
    int fd = open(argv[3], O_RDONLY);
    struct stat st;

    if (fd < 0 || fstat(fd, &st) < 0 || (size_t)st.st_size < (size_t)hi * recsize) {
        fprintf(stderr, "cannot read %ld records of %zu bytes from %s\n", hi, recsize, argv[3]);
        return 2;
    }
    const char *flights = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (flights == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    long n = hi - lo;
    int64_t *stamps = calloc(n, sizeof(*stamps));

    addrlen = bench_sockaddr(dst, port, &addr);
    if (!addrlen) {
        fprintf(stderr, "bad address %s\n", dst);
        return 2;
    }
    for (int i = 0; i < nsock; i++) {
        int sz = 4 << 20;

        socks[i] = socket(addr.ss_family, SOCK_DGRAM, 0);
        if (socks[i] < 0 || connect(socks[i], (struct sockaddr *)&addr, addrlen) < 0) {
            perror("socket/connect");
            return 1;
        }
        setsockopt(socks[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
    }
    int64_t interval = rate > 0 ? (int64_t)(1e9 * batch / rate) : 0;
    int64_t start = now_ns() + 1000000; /* 1 ms: let the receiver settle into poll() */
    long next = 0;
    int s = 0;

    for (long k = 0; next < n; k++) {
        int m = n - next < batch ? (int)(n - next) : batch;

        if (interval)
            sleep_until(start + k * interval);
        for (int i = 0; i < m; i++) {
            iov[i].iov_base = (void *)(flights + (size_t)(lo + next + i) * recsize);
            iov[i].iov_len = recsize;
            memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int64_t t = now_ns();
        int done = 0;

        while (done < m) {
            int r = sendmmsg(socks[s], msgs + done, m - done, 0);

            if (r <= 0) {
                failed += m - done; /* counted lost; the receiver sees them missing */
                break;
            }
            for (int i = 0; i < r; i++)
                stamps[next + done + i] = t;
            done += r;
            sent += r;
        }
        next += m;
        s = (s + 1) % nsock;
    }
    double elapsed = (now_ns() - start) / 1e9;
    FILE *out = fopen(argv[10], "wb");

    if (!out || fwrite(stamps, sizeof(*stamps), n, out) != (size_t)n || fclose(out) != 0) {
        perror("writing send times");
        return 1;
    }
    printf("%llu %llu %.6f\n", sent, failed, elapsed);
    return 0;
}
