/* steer.c: SK_REUSEPORT program that picks the socket of the UDP reuseport group for every
 * datagram to the service port, by QUIC connection ID.
 *
 * Why by CID and not by 4-tuple: the kernel's hash breaks on NAT rebinding and migration, and
 * it knows nothing of which app owns a connection. Server-chosen CIDs carry the worker slot
 * (QUIC-LB plaintext layout, decoded with the numbers in steerd.h and -D flags), so routing
 * after the first flight is stateless. Only the client-chosen DCIDs of the first flight need
 * state (initial_routes, written by the classifier). Servers in learned mode pick their own
 * CIDs: those are looked up in learned_cids, and a short header nothing else claims by its
 * client address in learned_peers (both written by learn.c; an empty slot there drops).
 * What may start a connection (Initial, 0-RTT, an unknown version) and is none of these
 * goes to a classifier socket, chosen by hashing the DCID so every datagram of one DCID
 * meets the same classifier process (probing on past dead ones); a short header or a
 * Handshake/Retry that nothing claims is dropped here. A datagram is never handed to a
 * random socket: returning SK_PASS without a selection would let the kernel hash it to any
 * app, so failures end in SK_DROP.
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
#define LEARNED_CIDS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARNED_CIDS))
#define LEARNED_PEERS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARNED_PEERS))
#define LEARN_CONFIG ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARN_CONFIG))
#define LEARN_COUNTS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARN_COUNTS))

#define QUIC_OFF STEERD_UDP_HEADER_LEN

/* Whether the datagram's destination is a multicast or (limited) broadcast address: such a
 * datagram is no client's connection to us, and answering it (Version Negotiation, a reset)
 * would make the daemon reply to a whole network segment's worth of spoofed senders. Read
 * from the IP header (the skb's network header) only on the way to a classifier: workers
 * only ever get datagrams whose CID or route names them. Directed broadcasts (a subnet's
 * broadcast address) need the routing table; the classifier drops those (steerd/daemon/service.py). */
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

/* A learned entry that is still alive: keep a proven one alive while it is used (written at
 * most once per half TTL, so a busy connection does not bounce the entry's cache line on
 * every datagram). An unproven one lives only until its short expiry, unless promoted. */
static __always_inline int learned_alive(struct steerd_route *entry, __u64 ttl_ns)
{
    __u64 now = bpf_ktime_get_ns();

    if (entry->expires_ns < now)
        return 0;
    if (!(entry->flags & STEERD_LEARNED_UNPROVEN) && entry->expires_ns - now < ttl_ns / 2)
        entry->expires_ns = now + ttl_ns;
    return 1;
}

/* Promote an unproven learned entry of `slot` (learn.c): column 0 for a CID, 1 for a client
 * address. It now counts against the slot's quota (proven column) instead of its unproven
 * budget and lives the full TTL. A slot at its quota keeps it unproven: it expires, as a
 * new entry used to be refused. Two CPUs promoting at once may count it twice; the sweep
 * recounts. */
static __always_inline void promote(struct steerd_route *entry, __u32 slot, __u32 column,
                                    struct steerd_learn_config *cfg, __u32 counter)
{
    __u32 proven = column * STEERD_WORKER_SLOTS + slot;
    __u32 unproven = (column + 2) * STEERD_WORKER_SLOTS + slot;
    __u32 quota = column ? cfg->peer_quota : cfg->cid_quota;
    __u32 *count = bpf_map_lookup_elem(LEARN_COUNTS, &proven);

    if (!count || *count >= quota) {
        steerd_count(STEERD_CNT_LEARN_PROMOTE_FULL);
        steerd_slot_count(slot, STEERD_SLOT_EGRESS_FULL);
        return;
    }
    __sync_fetch_and_add(count, 1);
    count = bpf_map_lookup_elem(LEARN_COUNTS, &unproven);
    if (count && *count)
        __sync_fetch_and_add(count, -1);
    entry->flags = 0;
    entry->expires_ns = bpf_ktime_get_ns() + cfg->ttl_ns;
    steerd_count(counter);
}

/* The client address:port and service port of the datagram, keyed as learned_peers. */
static __always_inline int sender_key(struct sk_reuseport_md *md, struct steerd_peer_key *peer)
{
    __u16 ports[2];

    if (bpf_skb_load_bytes(md, 0, ports, sizeof(ports)) < 0)
        return -1;
    peer->peer_port = ports[0];
    peer->local_port = ports[1];
    if (md->eth_protocol == bpf_htons(0x0800)) {          /* IPv4 saddr at 12 */
        peer->family = 4;
        return bpf_skb_load_bytes_relative(md, 12, peer->addr, 4, BPF_HDR_START_NET) < 0 ? -1 : 0;
    }
    if (md->eth_protocol == bpf_htons(0x86DD)) {          /* IPv6 saddr at 8 */
        peer->family = 6;
        return bpf_skb_load_bytes_relative(md, 8, peer->addr, 16, BPF_HDR_START_NET) < 0 ? -1 : 0;
    }
    return -1;
}

/* Deliver to the slot a learned entry names; an empty slot drops (a learned-mode server's
 * connections cannot be reset by steerd: it does not know their reset tokens). */
static __always_inline int to_learned(struct sk_reuseport_md *md, __u32 slot, __u32 counter,
                                      __u32 slot_stat)
{
    if (bpf_sk_select_reuseport(md, WORKERS, &slot, 0) == 0) {
        steerd_count(counter);
        steerd_slot_count(slot, slot_stat);
        return SK_PASS;
    }
    steerd_count(STEERD_CNT_STEER_LEARNED_DEAD_SLOT);
    return SK_DROP;
}

/* A client datagram carrying a live learned CID: to that CID's slot. The CID went only to
 * the client's address (in the server's long-header packet), so the datagram proves the
 * client is there: once delivered, an unproven CID entry is promoted, and so is the
 * sender's address entry when it is this slot's and unproven (a client's first Handshake
 * proves both; a client that moved proves its new address with its next datagram). A dead
 * slot's entries are not promoted: they are deleted when the slot is freed. */
static __always_inline int steer_learned_cid(struct sk_reuseport_md *md,
                                             struct steerd_route *entry,
                                             struct steerd_learn_config *cfg)
{
    struct steerd_peer_key peer = {};
    struct steerd_route *addr;
    __u32 slot = entry->slot;
    int verdict = to_learned(md, slot, STEERD_CNT_STEER_LEARNED_CID,
                             STEERD_SLOT_STEERED_LEARNED_CID);

    if (verdict != SK_PASS)
        return verdict;
    if (entry->flags & STEERD_LEARNED_UNPROVEN)
        promote(entry, slot, 0, cfg, STEERD_CNT_LEARN_PROMOTED_CID);
    if (sender_key(md, &peer) == 0) {
        addr = bpf_map_lookup_elem(LEARNED_PEERS, &peer);
        if (addr && addr->slot == slot && (addr->flags & STEERD_LEARNED_UNPROVEN) &&
            addr->expires_ns >= bpf_ktime_get_ns())
            promote(addr, slot, 1, cfg, STEERD_CNT_LEARN_PROMOTED_PEER);
    }
    return verdict;
}

/* A short header whose DCID is not in our layout: try it as a learned CID of each length
 * learned-mode apps registered, then the client's address:port (a client that switched to a
 * CID the server gave it in an encrypted NEW_CONNECTION_ID frame, which nothing can learn;
 * only a proven address: an unproven one may be a forged source the server answered).
 * Returns -1 when nothing was learned for it. */
static __always_inline int steer_learned_short(struct sk_reuseport_md *md)
{
    struct steerd_learn_config *cfg;
    struct steerd_route_key key;
    struct steerd_peer_key peer = {};
    struct steerd_route *entry;
    __u8 buf[STEERD_MAX_CID_LEN];
    __u32 zero = 0;

    cfg = bpf_map_lookup_elem(LEARN_CONFIG, &zero);
    if (!cfg || !cfg->lengths[0])
        return -1;
    /* Any short header that can be unprotected has 20 bytes after its first byte (RFC 9001
     * §5.4.2: a 4-byte packet number offset plus a 16-byte sample). */
    if (bpf_skb_load_bytes(md, QUIC_OFF + 1, buf, sizeof(buf)) < 0)
        return -1;
#pragma unroll
    for (int n = 0; n < STEERD_MAX_LEARN_LENGTHS; n++) {
        __u8 len = cfg->lengths[n];

        if (!len)
            break;
        __builtin_memset(&key, 0, sizeof(key));
        key.len = len;
#pragma unroll
        for (int i = 0; i < STEERD_MAX_CID_LEN; i++)
            key.cid[i] = i < len ? buf[i] : 0;
        entry = bpf_map_lookup_elem(LEARNED_CIDS, &key);
        if (entry && learned_alive(entry, cfg->ttl_ns))
            return steer_learned_cid(md, entry, cfg);
    }
    if (sender_key(md, &peer) < 0)
        return -1;
    entry = bpf_map_lookup_elem(LEARNED_PEERS, &peer);
    if (entry && !(entry->flags & STEERD_LEARNED_UNPROVEN) && learned_alive(entry, cfg->ttl_ns))
        return to_learned(md, entry->slot, STEERD_CNT_STEER_LEARNED_PEER,
                          STEERD_SLOT_STEERED_LEARNED_PEER);
    return -1;
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
        if (!steerd_our_slot(key.cid, &slot)) {
            int verdict = steer_learned_short(md);

            if (verdict >= 0)
                return verdict;
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
    if (len == STEERD_CID_LEN && steerd_our_slot(key.cid, &slot)) {
        if (bpf_sk_select_reuseport(md, WORKERS, &slot, 0) == 0) {
            steerd_count(STEERD_CNT_STEER_LONG_OURS_WORKER);
            return SK_PASS;
        }
        steerd_count(STEERD_CNT_STEER_LONG_OURS_DEAD_SLOT);
        return to_classifier(md, key.cid, len);
    }
    /* A learned server CID: the client's later Initials and its Handshake packets. */
    if (len > 0) {
        struct steerd_learn_config *cfg;
        __u32 zero = 0;

        cfg = bpf_map_lookup_elem(LEARN_CONFIG, &zero);
        if (cfg && cfg->lengths[0]) {
            route = bpf_map_lookup_elem(LEARNED_CIDS, &key);
            if (route && learned_alive(route, cfg->ttl_ns))
                return steer_learned_cid(md, route, cfg);
        }
    }
    /* No route and not ours: only a client's first flight (Initial, 0-RTT) or an unknown
     * version (Version Negotiation) is the classifier's business. A Handshake or Retry
     * here belongs to no connection of ours. */
    version = ((__u32)lh[0] << 24) | ((__u32)lh[1] << 16) | ((__u32)lh[2] << 8) | lh[3];
    /* The watchdog's canary (steerd.h): only here, so no routed or short-header packet
     * pays for it. */
    if (version == STEERD_CANARY_VERSION && len == STEERD_CANARY_DCID_LEN &&
        steerd_canary(key.cid)) {
        steerd_count(STEERD_CNT_STEER_CANARY);
        return SK_DROP;
    }
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
