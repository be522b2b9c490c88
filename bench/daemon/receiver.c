/* receiver.c: the app side of bench/daemon.py (built with gcc at run time).
 *
 * Why C: arrival times must be taken by something that costs little and adds little jitter,
 * or the receiver, not the daemon, is what the benchmark measures. It holds the sockets the
 * app got (worker sockets handed over by steerd, or the one plain socket of the direct
 * baseline), inherited as file descriptors, sleeps in poll() (it shares the machine's two
 * CPUs with the daemon, so it must not busy-poll), drains with recvmmsg, and stamps each
 * flight's first arrival with CLOCK_MONOTONIC, which the sender in the client namespace
 * reads too. A flight is recognised by its DCID (every flight has its own), so nothing is
 * embedded in the datagram; the flight file gives DCID -> index. It also checks that every
 * datagram arrives from the client's own address, which re-injection must preserve.
 *
 * It stops when every flight in [LO, HI) has arrived, or, once standard input is closed
 * (the orchestrator does that when the sender is done), after IDLE_MS without a datagram,
 * or at DEADLINE_S seconds.
 *
 * usage: receiver FLIGHTS RECSIZE COUNT LO HI CLIENT_IP IDLE_MS DEADLINE_S OUT FD...
 * prints "ready", then one JSON object: in_range, duplicates, other, wrong_source, per_fd, first_ns, last_ns
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_FDS 64

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* DCID (first 8 bytes, zero padded) -> flight index, open addressing. */
static uint64_t *keys;
static long *vals;
static size_t mask;

static uint64_t dcid_key(const unsigned char *pkt, size_t len, int *ok)
{
    uint64_t k = 0;

    *ok = 0;
    if (len < 7 || !(pkt[0] & 0x80))
        return 0;
    size_t dlen = pkt[5];

    if (dlen == 0 || 6 + dlen > len)
        return 0;
    memcpy(&k, pkt + 6, dlen < 8 ? dlen : 8);
    *ok = 1;
    return k;
}

static size_t slot_of(uint64_t k)
{
    uint64_t h = k * 0x9E3779B97F4A7C15ull;

    return (size_t)(h >> 17) & mask;
}

static void put(uint64_t k, long v)
{
    size_t i = slot_of(k);

    while (vals[i] >= 0)
        i = (i + 1) & mask;
    keys[i] = k;
    vals[i] = v;
}

static long get(uint64_t k)
{
    for (size_t i = slot_of(k); vals[i] >= 0; i = (i + 1) & mask)
        if (keys[i] == k)
            return vals[i];
    return -1;
}

int main(int argc, char **argv)
{
    if (argc < 11 || argc - 10 > MAX_FDS) {
        fprintf(stderr, "usage: %s FLIGHTS RECSIZE COUNT LO HI CLIENT_IP IDLE_MS DEADLINE_S "
                        "OUT FD...\n", argv[0]);
        return 2;
    }
    size_t recsize = (size_t)atol(argv[2]);
    long count = atol(argv[3]), lo = atol(argv[4]), hi = atol(argv[5]);
    const char *client = argv[6];
    int64_t idle = atol(argv[7]) * 1000000LL;
    int64_t deadline = now_ns() + (int64_t)(atof(argv[8]) * 1e9);
    int nfd = argc - 10;
    struct pollfd pfd[MAX_FDS + 1];
    unsigned long long per_fd[MAX_FDS] = {0};
    unsigned long long in_range = 0, dups = 0, other = 0, wrong_source = 0;
    unsigned char client4[4], client6[16];
    int is6 = strchr(client, ':') != NULL;

    if (is6 ? inet_pton(AF_INET6, client, client6) != 1 : inet_pton(AF_INET, client, client4) != 1) {
        fprintf(stderr, "bad CLIENT_IP %s\n", client);
        return 2;
    }
    int ffd = open(argv[1], O_RDONLY);
    struct stat st;

    if (ffd < 0 || fstat(ffd, &st) < 0 || (size_t)st.st_size < (size_t)count * recsize
        || lo < 0 || hi > count || lo >= hi) {
        fprintf(stderr, "bad flight file or range\n");
        return 2;
    }
    const unsigned char *flights = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, ffd, 0);
    size_t cap = 1;

    while (cap < (size_t)count * 2)
        cap <<= 1;
    mask = cap - 1;
    keys = calloc(cap, sizeof(*keys));
    vals = malloc(cap * sizeof(*vals));
    memset(vals, 0xff, cap * sizeof(*vals));
    for (long i = 0; i < count; i++) {
        int ok;
        uint64_t k = dcid_key(flights + (size_t)i * recsize, recsize, &ok);

        if (!ok) {
            fprintf(stderr, "flight %ld is not a long-header packet\n", i);
            return 2;
        }
        put(k, i);
    }
    munmap((void *)flights, st.st_size);
    int64_t *arrival = calloc(hi - lo, sizeof(*arrival));

    for (int i = 0; i < nfd; i++) {
        int size = 8 << 20;

        pfd[i].fd = atoi(argv[10 + i]);
        pfd[i].events = POLLIN;
        /* Same generous buffer in both modes, so a late wake-up of this process is not a loss. */
        if (setsockopt(pfd[i].fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
            setsockopt(pfd[i].fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    }
    pfd[nfd].fd = 0;
    pfd[nfd].events = POLLIN;
    printf("ready\n"); /* the orchestrator starts the sender only after this line */
    fflush(stdout);

    static char bufs[BATCH][2048];
    static struct sockaddr_storage names[BATCH];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int draining = 0;
    int64_t last = now_ns(), first_ns = 0, last_ns = 0;

    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof(bufs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
    }
    while (in_range < (unsigned long long)(hi - lo)) {
        int64_t t = now_ns();

        if (t >= deadline || (draining && t - last >= idle))
            break;
        int timeout = draining ? (int)((idle - (t - last)) / 1000000) + 1 : 100;

        if (poll(pfd, draining ? nfd : nfd + 1, timeout) < 0)
            continue;
        if (!draining && (pfd[nfd].revents & (POLLIN | POLLHUP))) {
            char c[64];

            if (read(0, c, sizeof(c)) <= 0)
                draining = 1;
            last = now_ns();
        }
        for (int f = 0; f < nfd; f++) {
            int r;

            if (!(pfd[f].revents & POLLIN))
                continue;
            for (int i = 0; i < BATCH; i++)
                msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
            while ((r = recvmmsg(pfd[f].fd, msgs, BATCH, MSG_DONTWAIT, NULL)) > 0) {
                int64_t at = now_ns();

                last = at;
                per_fd[f] += r;
                for (int i = 0; i < r; i++) {
                    int ok;
                    uint64_t k = dcid_key((unsigned char *)bufs[i], msgs[i].msg_len, &ok);
                    long idx = ok ? get(k) : -1;
                    struct sockaddr_storage *sa = &names[i];

                    if (sa->ss_family == AF_INET
                            ? is6 || memcmp(&((struct sockaddr_in *)sa)->sin_addr, client4, 4)
                            : !is6 || memcmp(&((struct sockaddr_in6 *)sa)->sin6_addr, client6, 16))
                        wrong_source++;
                    if (idx < lo || idx >= hi) {
                        other++;
                    } else if (arrival[idx - lo]) {
                        dups++;
                    } else {
                        arrival[idx - lo] = at;
                        in_range++;
                        if (!first_ns)
                            first_ns = at;
                        last_ns = at;
                    }
                    msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
                }
            }
        }
    }
    FILE *out = fopen(argv[9], "wb");

    if (!out || fwrite(arrival, sizeof(*arrival), hi - lo, out) != (size_t)(hi - lo)
        || fclose(out) != 0) {
        perror("writing arrival times");
        return 1;
    }
    printf("{\"in_range\": %llu, \"duplicates\": %llu, \"other\": %llu, \"wrong_source\": %llu, "
           "\"first_ns\": %lld, \"last_ns\": %lld, \"per_fd\": [",
           in_range, dups, other, wrong_source, (long long)first_ns, (long long)last_ns);
    for (int f = 0; f < nfd; f++)
        printf("%s%llu", f ? ", " : "", per_fd[f]);
    printf("]}\n");
    return 0;
}
