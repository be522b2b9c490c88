/* unicast.c: cgroup_skb/ingress program that keeps every broadcast and multicast datagram
 * away from every socket of the service port.
 *
 * Why a per-delivery hook: the kernel delivers a UDP datagram to a broadcast or multicast
 * address (224.0.0.1, 255.255.255.255, ff02::1, a subnet's directed broadcast) by cloning it
 * to EVERY matching wildcard-bound socket of the port (__udp4_lib_mcast_deliver,
 * __udp6_lib_mcast_deliver): no reuseport selection, so the steering program (steer.c) never
 * runs and every worker of every app would get, and answer, one spoofed Initial. The cgroup
 * ingress hook runs in sk_filter for each socket a datagram is queued to, each clone
 * included, and an app cannot remove it (it is attached with BPF_F_ALLOW_MULTI at the root of
 * the cgroup v2 hierarchy, like jail.c and learn.c). The XDP/TC guard is not enough: it is
 * optional and sits on chosen interfaces only.
 *
 * What it drops, for UDP sockets bound to the service port in the daemon's network namespace:
 *   - a link-layer broadcast or multicast frame (skb->pkt_type);
 *   - IPv4 224/4 (multicast) and 240/4 (reserved, so 255.255.255.255), IPv6 ff00::/8;
 *   - IPv4 to one of the host's broadcast addresses (a subnet's directed broadcast), which
 *     may arrive in a unicast frame: only the routing table knows them, so Python keeps
 *     `local_broadcasts` equal to the local table's broadcast routes (unicast.py).
 * Everything else passes at once (the first test is the socket's port, one load), so the
 * cost to the rest of the machine is one call and a compare per delivered packet.
 *
 * -D flags (steerd/daemon/dataplane/unicast.py): STEERD_UNICAST_PORT, STEERD_UNICAST_NETNS
 * (the daemon's network namespace cookie; left out where bpf_get_netns_cookie is not available
 * to cgroup_skb programs, and then the port is guarded in every namespace),
 * STEERD_FD_LOCAL_BROADCASTS, STEERD_FD_COUNTERS.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include "steerd.h"

#define LOCAL_BROADCASTS ((void *)bpf_pseudo_fd(1, STEERD_FD_LOCAL_BROADCASTS))

#define PASS 1
#define DROP 0

static __always_inline int drop(__u32 counter)
{
    steerd_count(counter);
    return DROP;
}

int steerd_unicast(struct __sk_buff *skb)
{
    struct bpf_sock *sk;
    __u32 daddr4;
    __u8 first;

    /* The receiving socket's own port (host order): everything else leaves here. */
    if (skb->local_port != STEERD_UNICAST_PORT)
        return PASS;
#ifdef STEERD_UNICAST_NETNS
    if (bpf_get_netns_cookie(skb) != STEERD_UNICAST_NETNS)
        return PASS;
#endif
    sk = skb->sk;
    if (!sk)
        return PASS;
    sk = bpf_sk_fullsock(sk);
    if (!sk || sk->protocol != IPPROTO_UDP)
        return PASS;
    if (skb->pkt_type == PACKET_MULTICAST)
        return drop(STEERD_CNT_UNICAST_DROP_MULTICAST);
    if (skb->pkt_type == PACKET_BROADCAST)
        return drop(STEERD_CNT_UNICAST_DROP_BROADCAST);
    /* skb->data is the network header here. */
    if (skb->protocol == bpf_htons(0x0800)) {              /* ETH_P_IP: daddr at 16 */
        if (bpf_skb_load_bytes(skb, 16, &daddr4, 4) < 0)
            return PASS;
        first = daddr4 & 0xff;                              /* network order: first octet */
        if (first >= 240)                                   /* 240/4, 255.255.255.255 */
            return drop(STEERD_CNT_UNICAST_DROP_BROADCAST);
        if (first >= 224)                                   /* 224/4 */
            return drop(STEERD_CNT_UNICAST_DROP_MULTICAST);
        if (bpf_map_lookup_elem(LOCAL_BROADCASTS, &daddr4))
            return drop(STEERD_CNT_UNICAST_DROP_BROADCAST);
        return PASS;
    }
    if (skb->protocol == bpf_htons(0x86DD)) {              /* ETH_P_IPV6: daddr at 24 */
        if (bpf_skb_load_bytes(skb, 24, &first, 1) < 0)
            return PASS;
        if (first == 0xff)                                  /* ff00::/8 */
            return drop(STEERD_CNT_UNICAST_DROP_MULTICAST);
    }
    return PASS;
}
