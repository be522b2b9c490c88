/* guard.c: the guard in front of the service port(s), at XDP (or TC ingress).
 *
 * Why in XDP: junk that RFC 9000 says a server must discard (Initials in datagrams under
 * 1200 bytes, datagrams too short to be QUIC, small datagrams of unknown versions) and
 * floods of new Initials are cheapest to drop before the kernel allocates an skb, and
 * counting each packet class here gives the daemon its traffic picture for free. The guard
 * only reads headers (no state but the optional flood buckets) and passes everything it does
 * not understand untouched: other ports, non-UDP, non-IP, IP fragments (a first fragment
 * to a service port is counted; later fragments carry no port and pass uncounted).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>
#include "steerd.h"

#define GUARD_CONFIG ((void *)bpf_pseudo_fd(1, STEERD_FD_GUARD_CONFIG))
#define BUCKETS ((void *)bpf_pseudo_fd(1, STEERD_FD_FLOOD_BUCKETS))

#ifndef STEERD_PORT_1
#define STEERD_PORT_1 STEERD_PORT_0
#endif
#ifndef STEERD_PORT_2
#define STEERD_PORT_2 STEERD_PORT_0
#endif
#ifndef STEERD_PORT_3
#define STEERD_PORT_3 STEERD_PORT_0
#endif

static __always_inline int is_service_port(__be16 port)
{
    return port == bpf_htons(STEERD_PORT_0) || port == bpf_htons(STEERD_PORT_1) ||
           port == bpf_htons(STEERD_PORT_2) || port == bpf_htons(STEERD_PORT_3);
}

/* One GCRA step on the bucket state ``*state``: 1 = within budget (and spent). Racy across
 * CPUs by design: an approximate budget is enough for a flood guard. */
static __always_inline int gcra(__u64 *state, __u64 now, __u64 interval, __u64 burst)
{
    __u64 tat = *state > now ? *state : now;

    if (tat - now > burst)
        return 0;
    *state = tat + interval;
    return 1;
}

#define FLOOD_OK 0
#define FLOOD_PREFIX 1   /* over the source prefix's budget */
#define FLOOD_TOTAL 2    /* over the budget of all prefixes together */

/* The flood guard's verdict on one new Initial (or 0-RTT) from ``key``'s source. */
static __always_inline int flood_check(struct steerd_bucket_key *key)
{
    __u32 zero = 0;
    struct steerd_guard_config *cfg = bpf_map_lookup_elem(GUARD_CONFIG, &zero);
    __u64 now, tat, *state;
    __u32 bits;

    if (!cfg || !cfg->flood_enabled)
        return FLOOD_OK;
    bits = key->family == 4 ? cfg->v4_prefix_len : cfg->v6_prefix_len;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        if (bits >= 8) {
            bits -= 8;
        } else if (bits > 0) {
            key->addr[i] &= (__u8)(0xff << (8 - bits));
            bits = 0;
        } else {
            key->addr[i] = 0;
        }
    }
    now = bpf_ktime_get_ns();
    state = bpf_map_lookup_elem(BUCKETS, key);
    if (!state) {
        tat = now + cfg->interval_ns;
        bpf_map_update_elem(BUCKETS, key, &tat, BPF_ANY);
    } else if (!gcra(state, now, cfg->interval_ns, cfg->burst_ns)) {
        return FLOOD_PREFIX;
    }
    if (cfg->total_interval_ns &&
        !gcra(&cfg->total_tat_ns, now, cfg->total_interval_ns, cfg->total_burst_ns))
        return FLOOD_TOTAL;
    return FLOOD_OK;
}

/* The verdict on one Ethernet frame: PASS or DROP. Shared by the XDP and the TC entry
 * points, so both attachments judge and count identically. */
#define PASS 1
#define DROP 0
#define MORE 2   /* headers reach past what is linear: the TC entry pulls more and retries */
static __always_inline int judge(void *data, void *end)
{
    struct ethhdr *eth = data;
    struct steerd_bucket_key src = {};
    struct udphdr *udp;
    __u8 *quic;
    __u32 plen, version, type;
    int flood;
    __u8 first;

    if ((void *)(eth + 1) > end)
        return PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);

        if ((void *)(ip + 1) > end)
            return MORE;
        if (ip->protocol != IPPROTO_UDP || ip->ihl < 5)
            return PASS;
        if (ip->frag_off & bpf_htons(0x1fff))
            return PASS; /* a later fragment: no UDP header; without its first, it dies */
        udp = (void *)ip + ip->ihl * 4;
        if ((void *)(udp + 1) > end)
            return MORE;
        if (!is_service_port(udp->dest))
            return PASS;
        if (ip->frag_off & bpf_htons(0x2000)) {
            /* First fragment: QUIC sets DF (RFC 9000 §14), and a fragmented datagram would
             * be judged nowhere whole. */
            steerd_count(STEERD_CNT_XDP_DROP_FRAGMENT);
            return DROP;
        }
        src.family = 4;
        __builtin_memcpy(src.addr, &ip->saddr, 4);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        __u8 *hdr = (void *)(ip6 + 1);
        __u8 next;
        int fragment = 0;

        if ((void *)(ip6 + 1) > end)
            return MORE;
        next = ip6->nexthdr;
#pragma unroll
        for (int i = 0; i < STEERD_MAX_IPV6_EXT_HEADERS; i++) {
            if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
                if ((void *)(hdr + 2) > end)
                    return MORE;
                next = hdr[0];
                hdr += (hdr[1] + 1) * 8;
            } else if (next == IPPROTO_AH) {
                if ((void *)(hdr + 2) > end)
                    return MORE;
                next = hdr[0];
                hdr += (hdr[1] + 2) * 4;
            } else if (next == IPPROTO_FRAGMENT) {
                if ((void *)(hdr + 8) > end)
                    return MORE;
                if (((hdr[2] << 8) | hdr[3]) & 0xfff8)
                    return PASS; /* a later fragment: no UDP header */
                fragment = 1;
                next = hdr[0];
                hdr += 8;
            } else {
                break;
            }
        }
        if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
            next == IPPROTO_AH || next == IPPROTO_FRAGMENT) {
            /* Longer than the walk: where it leads (maybe a service port) stays unknown, and
             * nothing real sends such a chain. */
            steerd_count(STEERD_CNT_XDP_DROP_EXT_CHAIN);
            return DROP;
        }
        if (next != IPPROTO_UDP)
            return PASS;
        udp = (void *)hdr;
        if ((void *)(udp + 1) > end)
            return MORE;
        if (!is_service_port(udp->dest))
            return PASS;
        if (fragment) {
            steerd_count(STEERD_CNT_XDP_DROP_FRAGMENT);
            return DROP;
        }
        src.family = 6;
        __builtin_memcpy(src.addr, &ip6->saddr, 16);
    } else {
        return PASS;
    }

    plen = bpf_ntohs(udp->len);
    if (plen < sizeof(*udp))
        return PASS; /* the kernel rejects a bad UDP length itself */
    plen -= sizeof(*udp);
    quic = (void *)(udp + 1);
    if (plen < 1) {
        steerd_count(STEERD_CNT_XDP_DROP_TOO_SHORT);
        return DROP;
    }
    /* Lengths come from the UDP header; bytes we cannot see (only possible for a
     * non-linear skb at TC) are not evidence against the packet. */
    if ((void *)(quic + 1) > end)
        return MORE;
    first = quic[0];
    if (!(first & STEERD_LONG_HEADER_BIT)) {
        if (plen < STEERD_MIN_SHORT_PACKET) {
            steerd_count(STEERD_CNT_XDP_DROP_TOO_SHORT);
            return DROP;
        }
        steerd_count(STEERD_CNT_XDP_SHORT);
        return PASS;
    }
    if (plen < STEERD_MIN_LONG_PACKET) {
        steerd_count(STEERD_CNT_XDP_DROP_TOO_SHORT);
        return DROP;
    }
    if ((void *)(quic + 6) > end)
        return MORE;
    version = ((__u32)quic[1] << 24) | ((__u32)quic[2] << 16) | ((__u32)quic[3] << 8) | quic[4];
    if (version == 0) {
        steerd_count(STEERD_CNT_XDP_VERSION_NEGOTIATION);
        return PASS;
    }
    type = (first >> 4) & 3;
    if (version == STEERD_QUIC_V2) {
        /* RFC 9369 §3.2: Initial 0b01, 0-RTT 0b10, Handshake 0b11, Retry 0b00. */
        type = (type + 3) & 3;
    } else if (version != STEERD_QUIC_V1) {
        if (plen < STEERD_MIN_INITIAL_DATAGRAM) {
            steerd_count(STEERD_CNT_XDP_DROP_SMALL_UNKNOWN_VERSION);
            return DROP;
        }
        steerd_count(STEERD_CNT_XDP_UNKNOWN_VERSION);
        return PASS;
    }
    if (quic[5] > STEERD_MAX_CID_LEN) {
        steerd_count(STEERD_CNT_XDP_DROP_BAD_CID_LEN);
        return DROP;
    }
    if (type == STEERD_TYPE_INITIAL) {
        if (plen < STEERD_MIN_INITIAL_DATAGRAM) {
            steerd_count(STEERD_CNT_XDP_DROP_SMALL_INITIAL);
            return DROP;
        }
        flood = flood_check(&src);
        if (flood != FLOOD_OK) {
            steerd_count(flood == FLOOD_PREFIX ? STEERD_CNT_XDP_DROP_RATE_LIMITED
                                               : STEERD_CNT_XDP_DROP_RATE_LIMITED_TOTAL);
            return DROP;
        }
        steerd_count(STEERD_CNT_XDP_INITIAL);
    } else if (type == STEERD_TYPE_0RTT) {
        /* 0-RTT before its Initial costs the classifier as much as an Initial: same budget. */
        flood = flood_check(&src);
        if (flood != FLOOD_OK) {
            steerd_count(flood == FLOOD_PREFIX ? STEERD_CNT_XDP_DROP_RATE_LIMITED_0RTT
                                               : STEERD_CNT_XDP_DROP_RATE_LIMITED_TOTAL);
            return DROP;
        }
        steerd_count(STEERD_CNT_XDP_0RTT);
    } else if (type == STEERD_TYPE_HANDSHAKE) {
        steerd_count(STEERD_CNT_XDP_HANDSHAKE);
    } else {
        steerd_count(STEERD_CNT_XDP_RETRY);
    }
    return PASS;
}

int steerd_guard(struct xdp_md *ctx)
{
    /* XDP sees the whole frame linear: MORE only means truncated, which the stack drops. */
    return judge((void *)(long)ctx->data, (void *)(long)ctx->data_end) == DROP ? XDP_DROP
                                                                              : XDP_PASS;
}

/* The same guard at TC ingress (tcx), for interfaces where native XDP is expensive: on veth
 * any native XDP program makes the kernel copy each locally built skb into a page with XDP
 * headroom, while TC sees the skb as it is. The headers the guard reads are pulled into the
 * linear area first (a no-op when they already are). */
int steerd_guard_tc(struct __sk_buff *skb)
{
    __u32 want = skb->len < STEERD_TC_PULL_LEN ? skb->len : STEERD_TC_PULL_LEN;
    int verdict;

    if ((long)skb->data_end - (long)skb->data < want)
        bpf_skb_pull_data(skb, want);
    verdict = judge((void *)(long)skb->data, (void *)(long)skb->data_end);
    if (verdict == MORE) {
        want = skb->len < STEERD_TC_PULL_MAX ? skb->len : STEERD_TC_PULL_MAX;
        bpf_skb_pull_data(skb, want);
        verdict = judge((void *)(long)skb->data, (void *)(long)skb->data_end);
    }
    return verdict == DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
