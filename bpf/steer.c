/* steer.c: SK_REUSEPORT program that picks the socket of the UDP reuseport group for every
 * datagram to the service port, by QUIC connection ID.
 *
 * Why by CID and not by 4-tuple: the kernel's hash breaks on NAT rebinding and migration, and
 * it knows nothing of which app owns a connection. Server-chosen CIDs carry the worker slot
 * (QUIC-LB plaintext layout, decoded with the numbers in steerd.h and -D flags), so routing
 * after the first flight is stateless. Only the client-chosen DCIDs of the first flight need
 * state (initial_routes, written by the classifier). Anything undecided goes to a classifier
 * socket, chosen by hashing the DCID so every datagram of one DCID meets the same classifier
 * process. A datagram is never handed to a random socket: returning SK_PASS without a
 * selection would let the kernel hash it to any app, so failures end in SK_DROP.
 *
 * Slot numbering: worker slots index the `workers` REUSEPORT_SOCKARRAY and are the numbers
 * CIDs carry (0..STEERD_WORKER_SLOTS-1); classifier sockets live in a second sockarray,
 * `classifiers` (0..STEERD_CLASSIFIER_SLOTS-1), so no CID can ever name a classifier.
 */
#include <uapi/linux/bpf.h>
#include "steerd.h"

#define WORKERS ((void *)bpf_pseudo_fd(1, STEERD_FD_WORKERS))
#define CLASSIFIERS ((void *)bpf_pseudo_fd(1, STEERD_FD_CLASSIFIERS))
#define ROUTES ((void *)bpf_pseudo_fd(1, STEERD_FD_INITIAL_ROUTES))

#define QUIC_OFF STEERD_UDP_HEADER_LEN

/* The worker slot a CID of STEERD_CID_LEN bytes names, if it is one of ours: the first
 * octet (config rotation + length bits) and host ID must match, as in CidLayout.decode. */
static __always_inline int our_slot(const __u8 *cid, __u32 *slot)
{
    __u32 value = 0;

    if (cid[0] != STEERD_CID_FIRST_OCTET)
        return 0;
#pragma unroll
    for (int i = 0; i < STEERD_CID_HOST_ID_LEN; i++) {
        if (cid[1 + i] !=
            (__u8)(((__u64)STEERD_CID_HOST_ID >> (8 * (STEERD_CID_HOST_ID_LEN - 1 - i))) & 0xff))
            return 0;
    }
#pragma unroll
    for (int i = 0; i < STEERD_CID_SLOT_LEN; i++)
        value = (value << 8) | cid[STEERD_CID_SLOT_OFFSET + i];
    if (value >= STEERD_WORKER_SLOTS)
        return 0;
    *slot = value;
    return 1;
}

/* Whether the datagram's destination is a multicast or (limited) broadcast address: such a
 * datagram is no client's connection to us, and answering it (Version Negotiation, a reset)
 * would make the daemon reply to a whole network segment's worth of spoofed senders. Read
 * from the IP header (the skb's network header) only on the way to a classifier: workers
 * only ever get datagrams whose CID or route names them. Directed broadcasts (a subnet's
 * broadcast address) need the routing table; the classifier drops those (steerd/daemon.py). */
static __always_inline int not_unicast(struct sk_reuseport_md *md)
{
    __u8 first = 0;

    if (md->eth_protocol == bpf_htons(0x0800)) {          /* ETH_P_IP: daddr at 16 */
        if (bpf_skb_load_bytes_relative(md, 16, &first, 1, BPF_HDR_START_NET) < 0)
            return 1;
        return first >= 224;                               /* 224/4 multicast, 240/4, 255.255.255.255 */
    }
    if (md->eth_protocol == bpf_htons(0x86DD)) {          /* ETH_P_IPV6: daddr at 24 */
        if (bpf_skb_load_bytes_relative(md, 24, &first, 1, BPF_HDR_START_NET) < 0)
            return 1;
        return first == 0xff;                              /* ff00::/8 multicast */
    }
    return 1;
}

/* FNV-1a over the DCID: cheap, stable, and the same for every datagram of one DCID. */
static __always_inline int to_classifier(struct sk_reuseport_md *md, const __u8 *cid, __u32 len)
{
    __u32 hash = 2166136261u;

    if (not_unicast(md)) {
        steerd_count(STEERD_CNT_STEER_DROP_NOT_UNICAST);
        return SK_DROP;
    }

#pragma unroll
    for (int i = 0; i < STEERD_MAX_CID_LEN; i++) {
        if (i < len) {
            hash ^= cid[i];
            hash *= 16777619u;
        }
    }
    /* Probe from the hashed slot so a dead classifier's share moves to the next live one. */
#pragma unroll
    for (__u32 i = 0; i < STEERD_CLASSIFIER_SLOTS; i++) {
        __u32 index = (hash + i) % STEERD_CLASSIFIER_SLOTS;

        if (bpf_sk_select_reuseport(md, CLASSIFIERS, &index, 0) == 0) {
            steerd_count(STEERD_CNT_STEER_TO_CLASSIFIER);
            return SK_PASS;
        }
    }
    steerd_count(STEERD_CNT_STEER_DROP_NO_CLASSIFIER);
    return SK_DROP;
}

int steerd_steer(struct sk_reuseport_md *md)
{
    struct steerd_route_key key = {};
    struct steerd_route *route;
    __u8 first = 0;
    __u8 lh[5];
    __u32 slot = 0;
    __u32 len, version, type;

    void *data = md->data;
    void *end = md->data_end;

    /* Fast path: the first byte and a short-header DCID sit in the linear part of the skb
     * (direct reads, no helper calls). Otherwise copy with bpf_skb_load_bytes. */
    if (data + QUIC_OFF + 1 + STEERD_CID_LEN <= end) {
        first = *(__u8 *)(data + QUIC_OFF);
        if (!(first & STEERD_LONG_HEADER_BIT)) {
            __builtin_memcpy(key.cid, data + QUIC_OFF + 1, STEERD_CID_LEN);
            goto short_header;
        }
    } else if (bpf_skb_load_bytes(md, QUIC_OFF, &first, 1) < 0) {
        goto malformed;
    }

    if (!(first & STEERD_LONG_HEADER_BIT)) {
        if (bpf_skb_load_bytes(md, QUIC_OFF + 1, key.cid, STEERD_CID_LEN) < 0)
            goto malformed;
short_header:
        if (!our_slot(key.cid, &slot)) {
            /* No worker issued it, and a classifier could only drop it: stay in the kernel
             * (random short headers are the cheapest junk there is). */
            steerd_count(STEERD_CNT_STEER_DROP_SHORT_NOT_OURS);
            return SK_DROP;
        }
        if (bpf_sk_select_reuseport(md, WORKERS, &slot, 0) == 0) {
            steerd_count(STEERD_CNT_STEER_SHORT_WORKER);
            return SK_PASS;
        }
        steerd_count(STEERD_CNT_STEER_SHORT_DEAD_SLOT);
        return to_classifier(md, key.cid, STEERD_CID_LEN);
    }

    /* Long header: version (4 bytes) and DCID length follow the first byte. */
    if (bpf_skb_load_bytes(md, QUIC_OFF + 1, lh, sizeof(lh)) < 0)
        goto malformed;
    len = lh[4];
    if (len > STEERD_MAX_CID_LEN) {
        /* Only an unknown version may carry such a DCID: the classifier answers with
         * Version Negotiation, which needs no per-connection affinity. */
        steerd_count(STEERD_CNT_STEER_LONG_NEW);
        return to_classifier(md, key.cid, 0);
    }
    if (len > 0 && bpf_skb_load_bytes(md, QUIC_OFF + 6, key.cid, len) < 0)
        goto malformed;
    key.len = len;

    route = bpf_map_lookup_elem(ROUTES, &key);
    if (route) {
        if (route->expires_ns && route->expires_ns < bpf_ktime_get_ns()) {
            steerd_count(STEERD_CNT_STEER_ROUTE_EXPIRED);
        } else {
            slot = route->slot;
            if (bpf_sk_select_reuseport(md, WORKERS, &slot, 0) == 0) {
                steerd_count(STEERD_CNT_STEER_ROUTE_HIT);
                return SK_PASS;
            }
            steerd_count(STEERD_CNT_STEER_ROUTE_DEAD_SLOT);
            return to_classifier(md, key.cid, len);
        }
    }
    if (len == STEERD_CID_LEN && our_slot(key.cid, &slot)) {
        if (bpf_sk_select_reuseport(md, WORKERS, &slot, 0) == 0) {
            steerd_count(STEERD_CNT_STEER_LONG_OURS_WORKER);
            return SK_PASS;
        }
        steerd_count(STEERD_CNT_STEER_LONG_OURS_DEAD_SLOT);
        return to_classifier(md, key.cid, len);
    }
    /* No route and not ours: only a client's first flight (Initial, 0-RTT) or an unknown
     * version (Version Negotiation) is the classifier's business. A Handshake or Retry
     * here belongs to no connection of ours. */
    version = ((__u32)lh[0] << 24) | ((__u32)lh[1] << 16) | ((__u32)lh[2] << 8) | lh[3];
    type = (first >> 4) & 3;
    if (version == STEERD_QUIC_V2)
        type = (type + 3) & 3;   /* RFC 9369 §3.2: Initial 0b01, 0-RTT 0b10 */
    if ((version == STEERD_QUIC_V1 || version == STEERD_QUIC_V2) &&
        type != STEERD_TYPE_INITIAL && type != STEERD_TYPE_0RTT) {
        steerd_count(STEERD_CNT_STEER_DROP_LONG_UNROUTABLE);
        return SK_DROP;
    }
    steerd_count(STEERD_CNT_STEER_LONG_NEW);
    return to_classifier(md, key.cid, len);

malformed:
    steerd_count(STEERD_CNT_STEER_MALFORMED);
    return to_classifier(md, key.cid, 0);
}
