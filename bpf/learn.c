/* learn.c: cgroup_skb/egress program that learns where a learned-mode server's connections
 * live, from the server's own packets on their way out.
 *
 * Why on egress: a QUIC server that does not write steerd's CID layout (a plain aioquic,
 * qh3 or hypercorn server) picks random CIDs, so nothing in a client's later packets names
 * its worker. But the server announces each connection's first CID in clear, as the Source
 * Connection ID of its long-header packets (Initial, Handshake, Retry), and that packet
 * passes through this hook before it leaves, with the socket it was sent from
 * (bpf_get_socket_cookie). So the kernel learns (length, server CID) -> slot before the
 * client can answer, and the steering program looks it up (bpf/steer.c). Every packet a
 * learned-mode socket sends also keeps (client address:port, service port) -> slot, for a
 * client that switches to a CID the server sent it encrypted (NEW_CONNECTION_ID).
 *
 * Attached at the cgroup v2 root (every process's sockets), one program per reuseport group,
 * it ignores everything that is not UDP from the group's port out of a socket Python listed
 * in learn_sockets, and never drops (returns 1): it only watches.
 *
 * What no app can do with it: learn a CID that decodes in steerd's layout (those belong to
 * the layout's slots) or a client-chosen DCID that has a first-flight route; overwrite or
 * evict another slot's live entry (first writer wins, and the tables are plain hashes that
 * refuse instead of evicting); hold more than its slot's quota (learn_counts).
 *
 * What nobody off the path can do with it: fill the tables with spoofed Initials. Every
 * entry learned here is unproven: it expires within seconds (unproven_ttl_ns) and counts in
 * a small per-slot unproven budget, not in the slot's quota, until steer.c sees a client
 * datagram carrying the learned CID, which only the host at the client's address can have.
 *
 * Layout-mode sockets are watched too: a long-header SCID that is not this slot's layout CID
 * is counted per slot (STEERD_SLOT_EGRESS_OFF_MODE), which is how `steerd exec` and `steerd
 * status` tell that an app does not write the CIDs it registered.
 */
#include <uapi/linux/bpf.h>
#include "steerd.h"

#define LEARN_SOCKETS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARN_SOCKETS))
#define LEARNED_CIDS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARNED_CIDS))
#define LEARNED_PEERS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARNED_PEERS))
#define LEARN_CONFIG ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARN_CONFIG))
#define LEARN_COUNTS ((void *)bpf_pseudo_fd(1, STEERD_FD_LEARN_COUNTS))
#define ROUTES ((void *)bpf_pseudo_fd(1, STEERD_FD_INITIAL_ROUTES))

#define LEARN_KNOWN 0      /* already this slot's (kept alive) */
#define LEARN_NEW 1
#define LEARN_CONFLICT 2
#define LEARN_FULL 3

/* One more entry for a slot, if its quota allows (a concurrent CPU may overshoot it by one:
 * the sweep in Python recounts). */
static __always_inline int take_quota(__u32 index, __u32 quota)
{
    __u32 *count = bpf_map_lookup_elem(LEARN_COUNTS, &index);

    if (!count || *count >= quota)
        return 0;
    __sync_fetch_and_add(count, 1);
    return 1;
}

/* First writer wins: a live entry of another slot stands; an expired one is taken over.
 *
 * What is written is unproven (STEERD_LEARNED_UNPROVEN): the server answered a datagram
 * that claimed to come from this client, and a source address is free to forge. So it takes
 * one of the slot's unproven budget (learn_counts column `unproven_index`), not its quota,
 * and lives cfg->unproven_ttl_ns from now; only the steering program promotes it (a client
 * datagram carrying the learned CID proves the client got the server's packet). A live
 * unproven entry of this slot is not kept alive by further packets (a server resending its
 * first flight to a forged address must not keep the entry); an expired one not yet swept
 * is renewed in place (it is still counted). A proven entry of this slot is kept alive. */
static __always_inline int learn(void *map, void *key, __u32 slot, __u32 unproven_index,
                                 struct steerd_learn_config *cfg)
{
    struct steerd_route *old = bpf_map_lookup_elem(map, key);
    __u64 now = bpf_ktime_get_ns();
    struct steerd_route value = {.slot = slot, .flags = STEERD_LEARNED_UNPROVEN,
                                 .expires_ns = now + cfg->unproven_ttl_ns};
    long ret;

    if (old) {
        if (old->slot == slot) {
            if (old->flags & STEERD_LEARNED_UNPROVEN) {
                if (old->expires_ns < now)
                    old->expires_ns = now + cfg->unproven_ttl_ns;
            } else if (old->expires_ns < now + cfg->ttl_ns / 2) {
                old->expires_ns = now + cfg->ttl_ns;
            }
            return LEARN_KNOWN;
        }
        if (old->expires_ns >= now)
            return LEARN_CONFLICT;
        if (!take_quota(unproven_index, cfg->unproven_quota))
            return LEARN_FULL;
        return bpf_map_update_elem(map, key, &value, BPF_EXIST) == 0 ? LEARN_NEW : LEARN_FULL;
    }
    if (!take_quota(unproven_index, cfg->unproven_quota))
        return LEARN_FULL;
    ret = bpf_map_update_elem(map, key, &value, BPF_NOEXIST);
    if (ret == 0)
        return LEARN_NEW;
    return ret == -17 /* EEXIST: another CPU was first */ ? LEARN_CONFLICT : LEARN_FULL;
}

static __always_inline void count_result(int result, __u32 slot, __u32 learned_counter,
                                         int count_learned)
{
    if (result == LEARN_NEW) {
        steerd_count(learned_counter);
        if (count_learned)
            steerd_slot_count(slot, STEERD_SLOT_EGRESS_LEARNED);
    } else if (result == LEARN_CONFLICT) {
        steerd_count(STEERD_CNT_LEARN_CONFLICT);
        steerd_slot_count(slot, STEERD_SLOT_EGRESS_CONFLICT);
    } else if (result == LEARN_FULL) {
        steerd_count(STEERD_CNT_LEARN_FULL);
        steerd_slot_count(slot, STEERD_SLOT_EGRESS_FULL);
    }
}

int steerd_learn(struct __sk_buff *skb)
{
    struct steerd_learn_socket *sock;
    struct steerd_learn_config *cfg;
    struct steerd_peer_key peer = {};
    struct steerd_route_key key = {};
    __u8 lh[6];   /* first byte, version, DCID length */
    __u8 scid[STEERD_MAX_CID_LEN];
    __u16 ports[2];
    __u32 udp_off, q, slot, named = 0, zero = 0, version, type;
    __u8 scid_len = 0;
    __u64 cookie;

    if (skb->protocol == bpf_htons(0x0800)) {
        __u8 ip[20];

        if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)) < 0 || ip[9] != 17)
            return 1;
        if ((ip[6] & 0x1f) || ip[7])    /* a later fragment: no UDP header */
            return 1;
        udp_off = (ip[0] & 0x0f) * 4;
        peer.family = 4;
        __builtin_memcpy(peer.addr, ip + 16, 4);
    } else if (skb->protocol == bpf_htons(0x86DD)) {
        __u8 ip[40];

        /* Our own UDP sockets send no extension headers. */
        if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)) < 0 || ip[6] != 17)
            return 1;
        udp_off = 40;
        peer.family = 6;
        __builtin_memcpy(peer.addr, ip + 24, 16);
    } else {
        return 1;
    }
    if (bpf_skb_load_bytes(skb, udp_off, ports, sizeof(ports)) < 0 ||
        ports[0] != bpf_htons(STEERD_LEARN_PORT))
        return 1;
    cookie = bpf_get_socket_cookie(skb);
    sock = bpf_map_lookup_elem(LEARN_SOCKETS, &cookie);
    if (!sock)
        return 1;
    slot = sock->slot;
    if (slot >= STEERD_WORKER_SLOTS)
        return 1;
    cfg = bpf_map_lookup_elem(LEARN_CONFIG, &zero);
    if (!cfg)
        return 1;

    if (sock->mode == STEERD_MODE_LEARNED) {
        peer.peer_port = ports[1];
        peer.local_port = ports[0];
        count_result(learn(LEARNED_PEERS, &peer, slot, 3 * STEERD_WORKER_SLOTS + slot, cfg),
                     slot, STEERD_CNT_LEARN_PEER, 0);
    }

    q = udp_off + 8;
    if (bpf_skb_load_bytes(skb, q, lh, sizeof(lh)) < 0 || !(lh[0] & STEERD_LONG_HEADER_BIT))
        return 1;
    version = ((__u32)lh[1] << 24) | ((__u32)lh[2] << 16) | ((__u32)lh[3] << 8) | lh[4];
    if (version != STEERD_QUIC_V1 && version != STEERD_QUIC_V2)
        return 1;
    type = (lh[0] >> 4) & 3;
    if (version == STEERD_QUIC_V2)
        type = (type + 3) & 3;   /* RFC 9369 §3.2 */
    if (type == STEERD_TYPE_0RTT)   /* a client's packet type: not a server's */
        return 1;
    steerd_slot_count(slot, STEERD_SLOT_EGRESS_LONG);
    if (lh[5] > STEERD_MAX_CID_LEN)
        return 1;
    q += 6 + lh[5];
    if (bpf_skb_load_bytes(skb, q, &scid_len, 1) < 0)
        return 1;
    /* A fixed-size read (every server long-header packet has 20 bytes past its SCID length:
     * at least a packet number and a 16-byte AEAD tag, or a Retry's integrity tag), then
     * the key zero-padded past the SCID, byte-identical to the steering program's. */
    if (scid_len == 0 || scid_len > STEERD_MAX_CID_LEN ||
        bpf_skb_load_bytes(skb, q + 1, scid, sizeof(scid)) < 0)
        scid_len = 0;
#pragma unroll
    for (int i = 0; i < STEERD_MAX_CID_LEN; i++)
        key.cid[i] = i < scid_len ? scid[i] : 0;
    key.len = scid_len;

    if (sock->mode != STEERD_MODE_LEARNED) {
        if (scid_len != STEERD_CID_LEN || !steerd_our_slot(key.cid, &named) || named != slot)
            steerd_slot_count(slot, STEERD_SLOT_EGRESS_OFF_MODE);
        return 1;
    }
    if (scid_len == 0 || scid_len != sock->cid_len) {
        steerd_slot_count(slot, STEERD_SLOT_EGRESS_OFF_MODE);
        return 1;
    }
    if ((scid_len == STEERD_CID_LEN && steerd_our_slot(key.cid, &named)) ||
        bpf_map_lookup_elem(ROUTES, &key)) {
        steerd_count(STEERD_CNT_LEARN_REFUSED);
        steerd_slot_count(slot, STEERD_SLOT_EGRESS_REFUSED);
        return 1;
    }
    count_result(learn(LEARNED_CIDS, &key, slot, 2 * STEERD_WORKER_SLOTS + slot, cfg),
                 slot, STEERD_CNT_LEARN_CID, 1);
    return 1;
}
