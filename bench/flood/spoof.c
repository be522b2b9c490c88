/* spoof.c: a flood of client Initials from many spoofed IPv4 source addresses, for
 * tests/reliability/test_flood.py (built with gcc at run time).
 *
 * Why C and a raw socket: the flood must come "as fast as the client namespace can send"
 * and from addresses nobody owns (a spoofer never sees the Retry it provokes), which a UDP
 * socket cannot do and a Python loop cannot do fast. IP_HDRINCL lets each packet carry its
 * own source address and port; sendmmsg sends BATCH per system call. The kernel fills in the
 * IP checksum and total length; the UDP checksum is 0 ("none", allowed for IPv4).
 *
 * Payloads are fixed-size records of FLIGHTS (real client Initial datagrams), sent round robin.
 * Sources are random addresses of SRCNET/BITS and random ports (xorshift: reproducible).
 *
 * usage: spoof DST PORT SRCNET BITS FLIGHTS RECSIZE SECONDS BATCH [frag]
 * prints: "sent failed elapsed_seconds" (records: a fragmented record counts once)
 *
 * With "frag", each record goes out as two IPv4 fragments that reassemble to the whole
 * datagram (the first carries the UDP header and FRAG_FIRST payload bytes), for the guard's
 * fragment rule: QUIC sets DF (RFC 9000 §14), so a fragmented datagram is junk.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256
#define MAX_PAYLOAD 1500
#define FRAG_FIRST 504 /* UDP payload bytes in a first fragment: 8 + 504 is a multiple of 8 */

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint32_t next_random(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 9 && !(argc == 10 && strcmp(argv[9], "frag") == 0)) {
        fprintf(stderr, "usage: %s DST PORT SRCNET BITS FLIGHTS RECSIZE SECONDS BATCH [frag]\n",
                argv[0]);
        return 2;
    }
    int frag = argc == 10;
    struct in_addr dst, srcnet;
    int port = atoi(argv[2]), bits = atoi(argv[4]), batch = atoi(argv[8]);
    size_t recsize = (size_t)atol(argv[6]);
    double seconds = atof(argv[7]);

    if (inet_pton(AF_INET, argv[1], &dst) != 1 || inet_pton(AF_INET, argv[3], &srcnet) != 1 ||
        bits < 1 || bits > 32 || batch < 1 || batch > MAX_BATCH / (frag ? 2 : 1) ||
        recsize < (frag ? FRAG_FIRST + 1 : 1) || recsize > MAX_PAYLOAD) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    int fd = open(argv[5], O_RDONLY);
    struct stat st;

    if (fd < 0 || fstat(fd, &st) < 0 || (size_t)st.st_size < recsize) {
        fprintf(stderr, "cannot read records from %s\n", argv[5]);
        return 2;
    }
    size_t records = (size_t)st.st_size / recsize;
    const uint8_t *flights = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);

    if (flights == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    int sock = socket(AF_INET, SOCK_RAW, IPPROTO_RAW); /* implies IP_HDRINCL */

    if (sock < 0) {
        perror("socket");
        return 1;
    }
    static uint8_t packets[MAX_BATCH][sizeof(struct iphdr) + sizeof(struct udphdr) + MAX_PAYLOAD];
    static struct mmsghdr msgs[MAX_BATCH];
    static struct iovec iov[MAX_BATCH];
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_addr = dst };
    uint32_t mask = bits == 32 ? 0xffffffffu : ~(0xffffffffu >> bits);
    uint32_t net = ntohl(srcnet.s_addr) & mask;
    size_t plen = sizeof(struct iphdr) + sizeof(struct udphdr) + recsize;

    int npackets = frag ? 2 * batch : batch;

    for (int i = 0; i < npackets; i++) {
        struct iphdr *ip = (struct iphdr *)packets[i];

        ip->version = 4;
        ip->ihl = 5;
        ip->ttl = 64;
        ip->protocol = IPPROTO_UDP;
        ip->daddr = dst.s_addr;
        ip->tot_len = htons((uint16_t)plen);
        struct udphdr *udp = (struct udphdr *)(ip + 1);

        udp->dest = htons((uint16_t)port);
        udp->len = htons((uint16_t)(sizeof(struct udphdr) + recsize));
        iov[i].iov_base = packets[i];
        iov[i].iov_len = plen;
        if (frag) { /* even: first fragment (MF); odd: the rest, at its offset */
            size_t first = sizeof(struct iphdr) + sizeof(struct udphdr) + FRAG_FIRST;

            iov[i].iov_len = i % 2 == 0 ? first : plen - first + sizeof(struct iphdr);
            ip->tot_len = htons((uint16_t)iov[i].iov_len);
            ip->frag_off = htons(i % 2 == 0 ? 0x2000
                                            : (sizeof(struct udphdr) + FRAG_FIRST) / 8);
        }
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &to;
        msgs[i].msg_hdr.msg_namelen = sizeof(to);
    }
    unsigned long long sent = 0, failed = 0;
    size_t next = 0;
    double start = now_s(), end = start + seconds;

    while (now_s() < end) {
        for (int i = 0; i < batch; i++) {
            struct iphdr *ip = (struct iphdr *)packets[i];
            struct udphdr *udp = (struct udphdr *)(ip + 1);

            ip->saddr = htonl(net | (next_random() & ~mask));
            ip->id = 0;
            udp->source = htons((uint16_t)(1024 + next_random() % 64000));
            udp->check = 0;
            memcpy(udp + 1, flights + next * recsize, recsize);
            next = (next + 1) % records;
        }
        if (frag) { /* spread each record over its two fragments, sharing one IP ID */
            for (int i = batch - 1; i >= 0; i--) {
                struct iphdr *whole = (struct iphdr *)packets[i];
                struct iphdr *a = (struct iphdr *)packets[2 * i];
                struct iphdr *b = (struct iphdr *)packets[2 * i + 1];
                uint8_t record[sizeof(struct iphdr) + sizeof(struct udphdr) + MAX_PAYLOAD];
                size_t head = sizeof(struct iphdr) + sizeof(struct udphdr) + FRAG_FIRST;
                uint16_t id = (uint16_t)(next_random() | 1);

                memcpy(record, whole, plen);
                memcpy((uint8_t *)a + sizeof(struct iphdr), record + sizeof(struct iphdr),
                       head - sizeof(struct iphdr));
                memcpy((uint8_t *)b + sizeof(struct iphdr), record + head, plen - head);
                a->saddr = b->saddr = ((struct iphdr *)record)->saddr;
                a->id = b->id = htons(id);
            }
        }
        int n = sendmmsg(sock, msgs, (unsigned)npackets, 0);

        if (n < 0) {
            if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) {
                perror("sendmmsg");
                return 1;
            }
            failed += (unsigned long long)batch;
            continue;
        }
        sent += (unsigned long long)(frag ? n / 2 : n);
        failed += (unsigned long long)(frag ? batch - n / 2 : batch - n);
    }
    printf("%llu %llu %.3f\n", sent, failed, now_s() - start);
    return 0;
}
