/* steerd.h: the one header shared by every steerd BPF program and read by Python.
 *
 * Why one header: the programs (steer.c, guard.c, jail.c, learn.c) and steerd/daemon/dataplane
 * must agree on every number (CID layout constants, counter indexes, map key and value
 * layouts). Python parses the "#define STEERD_*" lines below (the counter and slot_stats
 * names, map sizes), and tests/dataplane/test_dataplane_header.py checks the QUIC-LB, version
 * and learned-mode constants against quic/ and the Python that repeats them, so a change here
 * that is not made there fails a test instead of mis-steering packets.
 *
 * Fixed constants live here. Per-deployment values come from steerd/daemon/dataplane as -D flags:
 *   the CID layout from quic.cid.CidLayout.defines() (STEERD_CID_LEN, STEERD_CID_FIRST_OCTET,
 *   STEERD_CID_HOST_ID, STEERD_CID_HOST_ID_LEN, STEERD_CID_SLOT_OFFSET, STEERD_CID_SLOT_LEN),
 *   STEERD_WORKER_SLOTS, STEERD_CLASSIFIER_SLOTS, STEERD_PORT_0..3, STEERD_NPORTS (the guard),
 *   STEERD_LEARN_PORT (learn.c) and the map file descriptors STEERD_FD_* (maps are created by
 *   Python, referenced with bpf_pseudo_fd, so bcc never owns them and they can be pinned and
 *   reused across daemon restarts); jail.c gets its own (see there).
 */
#ifndef STEERD_H
#define STEERD_H

/* QUIC-LB plaintext CID layout (draft-ietf-quic-load-balancers); must equal quic/cid.py. */
#define STEERD_CONFIG_ROTATION_SHIFT 5
#define STEERD_LENGTH_MASK 0x1f
#define STEERD_CR_UNROUTABLE 7
#define STEERD_MIN_NONCE_LEN 4
#define STEERD_MAX_CID_LEN 20
#define STEERD_MAX_SLOT_LEN 4

/* QUIC wire facts (RFC 9000, RFC 9369). */
#define STEERD_QUIC_V1 0x00000001
#define STEERD_QUIC_V2 0x6b3343cf
#define STEERD_LONG_HEADER_BIT 0x80
/* RFC 9000 §14.1: a server MUST discard an Initial in a UDP payload under 1200 bytes, and
 * §6 (5.2.2): it MUST drop smaller datagrams of unsupported versions. */
#define STEERD_MIN_INITIAL_DATAGRAM 1200
/* Smallest short-header packet: a stateless reset may be as short as 21 bytes (§10.3). */
#define STEERD_MIN_SHORT_PACKET 21
/* Smallest long-header packet: first byte, version, DCID length, SCID length. */
#define STEERD_MIN_LONG_PACKET 7
/* Offset of the QUIC packet in an SK_REUSEPORT context: md->data is the UDP header. */
#define STEERD_UDP_HEADER_LEN 8
/* Bound for the IPv6 extension header walk in the XDP guard. */
#define STEERD_MAX_IPV6_EXT_HEADERS 6
/* Bytes the TC guard makes linear before judging: Ethernet + IPv6 + a few extension
 * headers + UDP + the 6 QUIC bytes it reads; when the headers reach further (long extension
 * header chains), it pulls up to STEERD_TC_PULL_MAX and judges again. */
#define STEERD_TC_PULL_LEN 128
#define STEERD_TC_PULL_MAX 1024
/* Upper bounds for maps; the actual sizes are chosen by Python. */
#define STEERD_MAX_CLASSIFIER_SLOTS 16
#define STEERD_MAX_WORKER_SLOTS 65536
#define STEERD_MAX_PORTS 4

/* Long-header packet types, as the guard names them after mapping v1/v2 type bits. */
#define STEERD_TYPE_INITIAL 0
#define STEERD_TYPE_0RTT 1
#define STEERD_TYPE_HANDSHAKE 2
#define STEERD_TYPE_RETRY 3

/* Per-CPU counters, one per branch: index into the `counters` PERCPU_ARRAY.
 * steerd/daemon/dataplane turns STEERD_CNT_FOO_BAR into the counter name "foo_bar". */
/* SK_REUSEPORT steering */
#define STEERD_CNT_STEER_SHORT_WORKER 0          /* short header -> the worker its CID names */
#define STEERD_CNT_STEER_DROP_SHORT_NOT_OURS 1   /* short header, CID not in our layout and
                                                  * nothing learned for it: dropped */
#define STEERD_CNT_STEER_SHORT_DEAD_SLOT 2       /* short header, named slot empty -> classifier */
#define STEERD_CNT_STEER_ROUTE_HIT 3             /* long header, initial_routes hit -> worker */
#define STEERD_CNT_STEER_ROUTE_EXPIRED 4         /* long header, route past its TTL (ignored) */
#define STEERD_CNT_STEER_ROUTE_DEAD_SLOT 5       /* route names an empty slot -> classifier */
#define STEERD_CNT_STEER_LONG_OURS_WORKER 6      /* long header, DCID is our CID -> worker */
#define STEERD_CNT_STEER_LONG_OURS_DEAD_SLOT 7   /* our CID, slot empty -> classifier */
#define STEERD_CNT_STEER_LONG_NEW 8              /* Initial/0-RTT/unknown version, no route, not
                                                  * ours, not learned -> classifier */
#define STEERD_CNT_STEER_MALFORMED 9             /* header unreadable -> classifier */
#define STEERD_CNT_STEER_TO_CLASSIFIER 10        /* total delivered to a classifier socket */
#define STEERD_CNT_STEER_DROP_NO_CLASSIFIER 11   /* wanted a classifier, none alive: dropped */
/* the guard, at XDP or TC (only UDP to a service port is classified; all else passes
 * uncounted) */
#define STEERD_CNT_XDP_INITIAL 16
#define STEERD_CNT_XDP_0RTT 17
#define STEERD_CNT_XDP_HANDSHAKE 18
#define STEERD_CNT_XDP_RETRY 19
#define STEERD_CNT_XDP_SHORT 20
#define STEERD_CNT_XDP_VERSION_NEGOTIATION 21
#define STEERD_CNT_XDP_UNKNOWN_VERSION 22
#define STEERD_CNT_XDP_DROP_FRAGMENT 23          /* first IP fragment to a service port: dropped
                                                  * (QUIC sets DF, RFC 9000 §14) */
#define STEERD_CNT_XDP_DROP_TOO_SHORT 24
#define STEERD_CNT_XDP_DROP_SMALL_INITIAL 25
#define STEERD_CNT_XDP_DROP_SMALL_UNKNOWN_VERSION 26
#define STEERD_CNT_XDP_DROP_BAD_CID_LEN 27
#define STEERD_CNT_XDP_DROP_RATE_LIMITED 28
/* the socket jail (cgroup hooks, bpf/jail.c): calls refused to a non-daemon process on a
 * service-port UDP socket */
#define STEERD_CNT_JAIL_REFUSED_SETSOCKOPT 32    /* reuseport program attach/detach, bind to device */
#define STEERD_CNT_JAIL_REFUSED_CONNECT 33
#define STEERD_CNT_JAIL_REFUSED_BIND 34          /* a new socket bound to the service port */
/* steering: datagrams not to a local unicast address (multicast, limited broadcast) */
#define STEERD_CNT_STEER_DROP_NOT_UNICAST 35
/* steering: a v1/v2 Handshake or Retry with no route and no CID of ours (no first flight
 * of ours ever made such a packet) */
#define STEERD_CNT_STEER_DROP_LONG_UNROUTABLE 36
/* the guard: an IPv6 extension header chain longer than it walks (nothing real sends one) */
#define STEERD_CNT_XDP_DROP_EXT_CHAIN 37
/* the guard: 0-RTT over its source prefix's budget (the Initials' token bucket) */
#define STEERD_CNT_XDP_DROP_RATE_LIMITED_0RTT 38
/* the guard: within its prefix's budget, but over the budget of all prefixes together */
#define STEERD_CNT_XDP_DROP_RATE_LIMITED_TOTAL 39
/* steering by learned CIDs (bpf/learn.c learns them from the servers' own packets) */
#define STEERD_CNT_STEER_LEARNED_CID 40          /* DCID is a learned server CID -> worker */
#define STEERD_CNT_STEER_LEARNED_PEER 41         /* short header, no CID known, client address
                                                  * learned -> worker */
#define STEERD_CNT_STEER_LEARNED_DEAD_SLOT 42    /* learned entry names an empty slot: dropped */
/* learning, on the egress path of worker sockets registered in learned mode */
#define STEERD_CNT_LEARN_CID 43                  /* a server CID learned */
#define STEERD_CNT_LEARN_PEER 44                 /* a client address learned */
#define STEERD_CNT_LEARN_REFUSED 45              /* CID in our layout, or a client-chosen route:
                                                  * never learned */
#define STEERD_CNT_LEARN_CONFLICT 46             /* already another slot's (first writer wins) */
#define STEERD_CNT_LEARN_FULL 47                 /* the slot's quota or the table is full */
/* the socket jail's allowlist and its 32-bit hook (jail.c, compat.c) */
#define STEERD_CNT_JAIL_NOOP_SETSOCKOPT 48       /* SO_REUSEADDR/SO_REUSEPORT set on: answered as
                                                  * done, nothing changed */
#define STEERD_CNT_JAIL_KILLED_COMPAT 49         /* a 32-bit setsockopt outside the allowlist on
                                                  * a service socket: the caller killed */
#define STEERD_CNT_JAIL_COMPAT_UNREADABLE 50     /* a 32-bit setsockopt whose descriptor could
                                                  * not be read: let through (the watchdog
                                                  * repairs) */
/* non-unicast datagrams dropped on their way into a service socket, each clone of a
 * broadcast or multicast delivery counted (cgroup_skb/ingress, bpf/unicast.c) */
#define STEERD_CNT_UNICAST_DROP_MULTICAST 58     /* IPv4 224/4, IPv6 ff00::/8, or an L2 multicast */
#define STEERD_CNT_UNICAST_DROP_BROADCAST 59     /* 240/4 (255.255.255.255), a local broadcast
                                                  * address, or an L2 broadcast */
/* learned mode's proof of address (steer.c): an entry learned from a server's packet is
 * unproven (STEERD_LEARNED_UNPROVEN) until a client's datagram carries its CID */
#define STEERD_CNT_LEARN_PROMOTED_CID 60         /* unproven learned CID proven: now counts
                                                  * against the slot's learned_quota */
#define STEERD_CNT_LEARN_PROMOTED_PEER 61        /* unproven client address proven (its datagram
                                                  * came with a CID learned for the same slot) */
#define STEERD_CNT_LEARN_PROMOTE_FULL 62         /* proven, but the slot's quota is full: stays
                                                  * unproven and expires */
/* the guard's kernel Retry and token check (guard.c, docs/DATAPLANE.md "Kernel Retry"). Past
 * STEERD_CANARY_SECRET (63), hence STEERD_CNT_MAX 96: a daemon of an older layout must purge. */
#define STEERD_CNT_XDP_RETRY_AUTO 64             /* a token-less Initial over retry_initial_rate:
                                                  * Retry mode on (or held on) in "auto" */
#define STEERD_CNT_XDP_RETRY_SENT 65             /* token-less Initial answered with a Retry */
#define STEERD_CNT_XDP_RETRY_RATE_LIMITED 66     /* over its prefix's Retry budget: dropped */
#define STEERD_CNT_XDP_RETRY_RATE_LIMITED_TOTAL 67 /* over the Retry budget of all: dropped */
#define STEERD_CNT_XDP_RETRY_FALLBACK 68         /* cannot be answered here (IPv4 options, IPv6
                                                  * extension headers, no GHASH tables, packet
                                                  * not writable): passed to the classifier */
#define STEERD_CNT_XDP_DROP_INITIAL_MALFORMED 69 /* v1/v2 Initial whose SCID or token length runs
                                                  * past the datagram: dropped */
#define STEERD_CNT_XDP_TOKEN_VALID 70            /* a token of ours, MAC and age good: passed */
#define STEERD_CNT_XDP_DROP_TOKEN_INVALID 71     /* a token of ours with a bad MAC (forged,
                                                  * another address, another DCID): dropped */
#define STEERD_CNT_XDP_DROP_TOKEN_EXPIRED 72     /* older than token_lifetime, or from the future */
#define STEERD_CNT_XDP_TOKEN_OTHER 73            /* a token not of our format (an app's
                                                  * NEW_TOKEN): passed */
#define STEERD_CNT_XDP_TOKEN_UNCHECKED 74        /* a token of ours but no key in guard_config:
                                                  * passed (the classifier checks it) */
#define STEERD_CNT_XDP_DROP_RETRY_FAILED 75     /* the Retry was built but the frame could not
                                                  * be trimmed: dropped */
#define STEERD_CNT_XDP_RETRY_PROVEN 76           /* token-less Initial in Retry mode from a
                                                  * proven address within its budget: not
                                                  * retried, passed on to the flood guard */
#define STEERD_CNT_MAX 96

/* initial_routes: LRU hash, client-chosen DCID -> worker slot. The key is zero-padded past
 * `len` so Python and BPF build byte-identical keys. */
struct steerd_route_key {
    __u8 len;
    __u8 cid[STEERD_MAX_CID_LEN];
    __u8 pad[3];
};                                    /* 24 bytes */

struct steerd_route {
    __u32 slot;
    __u32 flags;                      /* routes: 0; learned: STEERD_LEARNED_UNPROVEN */
    __u64 expires_ns;                 /* CLOCK_MONOTONIC (bpf_ktime_get_ns); 0 = no expiry */
};                                    /* 16 bytes */

/* guard_config: ARRAY of one entry, written by Python. Flood guard = GCRA per source
 * prefix: a bucket's "theoretical arrival time" advances by interval_ns per Initial and an
 * Initial is dropped when it would run more than burst_ns ahead of now. The total_* bucket
 * does the same for all prefixes together (0 = off): the per-prefix table is an LRU, and an
 * attacker with many prefixes (an IPv6 /48 is cheap) evicts buckets as fast as it makes
 * them, so only a cap on the whole bounds what reaches the classifiers. Its state lives
 * here, not in the LRU, so nothing evicts it. */
struct steerd_guard_config {
    __u32 flood_enabled;
    __u8 v4_prefix_len;
    __u8 v6_prefix_len;
    __u16 pad;
    __u64 interval_ns;
    __u64 burst_ns;
    __u64 total_interval_ns;
    __u64 total_burst_ns;
    __u64 total_tat_ns;               /* written by the guard */
    /* Kernel Retry (guard.c): a token-less v1/v2 Initial is answered with a Retry while
     * bpf_ktime_get_ns() < retry_until_ns (STEERD_RETRY_ALWAYS: always; 0: never). The daemon
     * writes it: "always", or in "auto" now + retry_hold whenever it sees a flood. */
    __u64 retry_until_ns;
    /* The token MAC key (SipHash-2-4, quic/token.py), the daemon's; token_check 0: no key,
     * tokens pass unchecked to the classifier. */
    __u64 token_k0;
    __u64 token_k1;
    __u64 token_lifetime_ms;
    __u32 token_check;
    __u32 pad2;
    /* Retries' own GCRA budget: per source prefix (buckets in flood_buckets, key pad[0] =
     * STEERD_BUCKET_RETRY, prefix lengths as above) and in all (0 = no total cap). */
    __u64 retry_interval_ns;
    __u64 retry_burst_ns;
    __u64 retry_total_interval_ns;
    __u64 retry_total_burst_ns;
    __u64 retry_total_tat_ns;         /* written by the guard */
    /* "auto": the guard turns Retry mode on by itself, with no daemon in the loop, when
     * token-less Initials arrive faster than one per auto_interval_ns (GCRA, burst
     * auto_burst_ns): retry_until_ns = now + auto_hold_ns, renewed while the rate lasts.
     * auto_hold_ns 0: no automatic Retry mode. */
    __u64 auto_interval_ns;
    __u64 auto_burst_ns;
    __u64 auto_hold_ns;
    __u64 auto_tat_ns;                /* written by the guard */
    /* A source address that presented a valid token of ours is "proven" for proven_ttl_ns
     * (an entry in flood_buckets, key pad[0] = STEERD_BUCKET_PROVEN, the whole address):
     * its token-less Initials skip Retry mode and meet only the flood guard, so a real
     * client pays the Retry round trip once per proven_ttl, not per connection. 0: never.
     * Each proven address may skip it proven_interval_ns apart (GCRA, burst proven_burst_ns;
     * key pad[1] = 1); past that its Initials are retried again, so a sender spoofing a
     * proven address reaches Python at that rate at most. */
    __u64 proven_ttl_ns;
    __u64 proven_interval_ns;
    __u64 proven_burst_ns;
};                                    /* 184 bytes */
#define STEERD_RETRY_ALWAYS 0xffffffffffffffff
#define STEERD_BUCKET_INITIAL 0           /* steerd_bucket_key.pad[0]: the Initials' budget */
#define STEERD_BUCKET_RETRY 1             /* ... the Retries' budget */
#define STEERD_BUCKET_PROVEN 2            /* ... a proven address (value: until when, ns) */
/* The kernel Retry's SCID: the unroutable config-rotation codepoint (never a layout CID, so
 * the retried Initial reaches a classifier), length bits, then random bytes; as long as
 * steerd/daemon/classifier.py RETRY_CID_LEN. */
#define STEERD_RETRY_SCID_LEN 16
/* An IPv4 Retry's IP header checksum and the UDP checksum are computed over at most this many
 * bytes of Retry (1 + 4 + 1 + 20 + 1 + 16 + token + 16 tag, padded). */
#define STEERD_RETRY_BUF 128
/* guard_scratch: PERCPU_ARRAY of one, guard.c's struct retry_scratch (the Retry, its
 * pseudo-packet, the MAC input, the tag, the new SCID, a token read from an Initial). */
#define STEERD_GUARD_SCRATCH_SIZE 572

/* flood_buckets: LRU hash, source prefix -> GCRA state (u64 tat_ns). */
struct steerd_bucket_key {
    __u8 family;                      /* 4 or 6 */
    __u8 pad[3];
    __u8 addr[16];                    /* masked to the prefix length */
};                                    /* 20 bytes */

/* Learned mode (bpf/learn.c, docs/DATAPLANE.md): servers that pick their own random CIDs
 * are steered by what their own long-header packets show on the way out.
 *
 * learn_sockets: HASH, socket cookie (u64) -> how that worker socket is steered. Written by
 * Python for every worker socket (layout-mode ones too: their egress is checked against
 * the layout and mismatches are counted per slot). */
#define STEERD_MODE_LAYOUT 1
#define STEERD_MODE_LEARNED 2
struct steerd_learn_socket {
    __u32 slot;
    __u8 mode;                        /* STEERD_MODE_* */
    __u8 cid_len;                     /* learned mode: the length of every CID it issues */
    __u16 pad;
};                                    /* 8 bytes */

/* learned_cids: HASH, (length, server CID) -> slot, keyed and valued like initial_routes
 * (struct steerd_route_key / steerd_route). Not an LRU: a full table refuses new entries
 * instead of evicting another app's, and per-slot quotas (learn_counts) keep one app from
 * filling it. Entries expire (expires_ns) and Python sweeps them.
 * learned_peers: HASH, client address:port and service port -> slot, same value. */
struct steerd_peer_key {
    __u8 family;                      /* 4 or 6 */
    __u8 pad;
    __u16 peer_port;                  /* network order, as on the wire */
    __u16 local_port;                 /* network order */
    __u16 pad2;
    __u8 addr[16];                    /* IPv4: the first 4 bytes, the rest 0 */
};                                    /* 24 bytes */

/* learn_config: ARRAY of one entry, written by Python. */
#define STEERD_MAX_LEARN_LENGTHS 4
struct steerd_learn_config {
    __u32 cid_quota;                  /* learned CIDs per slot */
    __u32 peer_quota;                 /* learned client addresses per slot */
    __u64 ttl_ns;                     /* an entry lives this long after its last use */
    __u8 lengths[STEERD_MAX_LEARN_LENGTHS]; /* CID lengths learned-mode apps use; 0 = none */
    __u32 unproven_quota;             /* unproven entries per slot, CIDs and peers apart */
    __u64 unproven_ttl_ns;            /* an unproven entry lives this long after it was learned */
};                                    /* 32 bytes */

/* An entry learned on egress is unproven (flags bit): the server answered a datagram that
 * claimed to come from that client address, which anyone can forge. It lives
 * unproven_ttl_ns (not extended by later egress), counts against the slot's
 * unproven_quota, and is promoted by the steering program (flag cleared, ttl_ns, the
 * slot's quota) when a client datagram carrying the learned CID arrives: only the host at
 * that address received the CID. Promotion of the address entry needs the same datagram to
 * come from it. */
#define STEERD_LEARNED_UNPROVEN 1

/* learn_counts: ARRAY of u32, entries each slot holds: index slot (proven CIDs),
 * STEERD_WORKER_SLOTS + slot (proven peers), 2 * STEERD_WORKER_SLOTS + slot (unproven
 * CIDs), 3 * STEERD_WORKER_SLOTS + slot (unproven peers). BPF adds (and moves one from
 * unproven to proven on promotion); Python's sweep recounts. */
#define STEERD_LEARN_COUNT_COLUMNS 4

/* slot_stats: PERCPU_ARRAY of u64, index slot * STEERD_SLOT_STATS + STEERD_SLOT_*: how each
 * slot's packets are steered and what its egress shows (steerd status, per app). */
#define STEERD_SLOT_STEERED_LEARNED_CID 0 /* in: steered by a learned CID */
#define STEERD_SLOT_STEERED_LEARNED_PEER 1 /* in: steered by a learned client address */
#define STEERD_SLOT_EGRESS_LONG 2         /* out: long-header packets (Initial/Handshake/Retry) */
#define STEERD_SLOT_EGRESS_LEARNED 3      /* out: a new CID learned from one */
#define STEERD_SLOT_EGRESS_OFF_MODE 4     /* out: SCID not as registered (layout mode: not in
                                           * the layout or not this slot's; learned mode:
                                           * another length) */
#define STEERD_SLOT_EGRESS_REFUSED 5      /* out: learned mode, CID in the layout or a route */
#define STEERD_SLOT_EGRESS_CONFLICT 6     /* out: CID or address already another slot's */
#define STEERD_SLOT_EGRESS_FULL 7         /* out: quota or table full */
#define STEERD_SLOT_STATS 8

#define STEERD_ROUTE_KEY_SIZE 24
#define STEERD_ROUTE_VALUE_SIZE 16
#define STEERD_GUARD_CONFIG_SIZE 184
#define STEERD_BUCKET_KEY_SIZE 20
#define STEERD_LEARN_SOCKET_SIZE 8
#define STEERD_PEER_KEY_SIZE 24
#define STEERD_LEARN_CONFIG_SIZE 32


/* The socket jail's allowlist (`jail_options`, shared by jail.c and compat.c): key
 * steerd_jail_option_key(level, optname), value a verdict; an option not in it is refused. */
#define STEERD_JAIL_ALLOW 1    /* harmless to other tenants: passes */
#define STEERD_JAIL_ON_ONLY 2  /* SO_REUSEADDR/SO_REUSEPORT: setting it on is a no-op, off refused */
#define STEERD_JAIL_OPTIONS_MAX 128
#define STEERD_JAIL_OFFENCE_SIZE 16
#define steerd_jail_option_key(level, optname) \
    ((((__u64)(__u32)(level)) << 32) | (__u64)(__u32)(optname))

/* Shared BPF-side helper: the 8 bytes at p as a little-endian word, by byte loads (p need not
 * be aligned). The one loader of the GHASH tables (ghash.h), the token key (guard.c) and
 * the crypto selftest. */
static __always_inline __u64 steerd_load_le64(const __u8 *p)
{
    __u64 w = 0;

#pragma unroll
    for (int j = 0; j < 8; j++)
        w |= (__u64)p[j] << (8 * j);
    return w;
}

/* Shared BPF-side helper: one per-CPU counter bump (only in programs given the counters fd). */
#ifdef STEERD_FD_COUNTERS
static __always_inline void steerd_count(__u32 idx)
{
    __u64 *value = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, STEERD_FD_COUNTERS), &idx);

    if (value)
        *value += 1;
}
#endif

/* The worker slot a CID of STEERD_CID_LEN bytes names, if it is one of ours: the first
 * octet (config rotation + length bits) and host ID must match, as in CidLayout.decode.
 * Shared by the steering program (where to send) and the learner (what never to learn). */
#ifdef STEERD_CID_LEN
static __always_inline int steerd_our_slot(const __u8 *cid, __u32 *slot)
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
#endif

/* Count one event of a slot in slot_stats (programs given that map's fd). */
#ifdef STEERD_FD_SLOT_STATS
static __always_inline void steerd_slot_count(__u32 slot, __u32 what)
{
    __u32 idx = slot * STEERD_SLOT_STATS + what;
    __u64 *value = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, STEERD_FD_SLOT_STATS), &idx);

    if (value)
        *value += 1;
}
#endif

/* The watchdog's canary (steerd/daemon/watchdog.py): proof that a group's program is steerd's.
 * Every watch period the daemon sends one datagram per group to the service address: a long
 * header of version STEERD_CANARY_VERSION (no QUIC version) whose 8-byte DCID is a per-run
 * secret the daemon writes into every CPU's copy of `counters` entry STEERD_CANARY_SECRET
 * (past the counters: never reported as one). Only this program can compare it, so only it
 * bumps STEERD_CNT_STEER_CANARY and drops the datagram; the daemon sees the counter advance,
 * or re-attaches its program. A sender without the secret (2^-59: the first octet's top bits
 * are fixed to the unroutable codepoint, never a layout CID) takes the normal path. */
#define STEERD_CANARY_VERSION 0x57ee0c0a
#define STEERD_CANARY_DCID_LEN 8
#define STEERD_CNT_STEER_CANARY 56               /* a canary with the daemon's secret: dropped */
#define STEERD_CANARY_SECRET 63                  /* `counters` index holding the secret (u64) */

#ifdef STEERD_FD_COUNTERS
/* Whether a DCID of STEERD_CANARY_DCID_LEN bytes is the daemon's canary secret (0: none set). */
static __always_inline int steerd_canary(const __u8 *cid)
{
    __u32 idx = STEERD_CANARY_SECRET;
    __u64 *secret = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, STEERD_FD_COUNTERS), &idx);
    __u64 have = 0;

    if (!secret || !*secret)
        return 0;
    __builtin_memcpy(&have, cid, sizeof(have));
    return have == *secret;
}
#endif

/* Retry tokens (quic/token.py, bpf/siphash.h): one format for kernel- and
 * daemon-minted tokens, so either side validates the other's.
 *   token = magic u8 | issued_ms u64 big-endian | odcid_len u8 | odcid (<= 20) | MAC (8)
 * issued_ms is CLOCK_MONOTONIC in ms (bpf_ktime_get_ns() / 1000000 = time.monotonic() * 1000).
 * MAC = SipHash-2-4 under the daemon's 128-bit token key (k0, k1: its two halves as
 * little-endian u64s), written as the 8 little-endian bytes of its 64-bit value, over
 *   issued_ms u64 big-endian | odcid_len u8 | odcid | addr_len u8 (4 or 16) |
 *   client address (network order) | scid_len u8 | Retry SCID (<= 20)
 * (token bytes 1 .. 1 + 8 + 1 + odcid_len, then the binding). */
#define STEERD_TOKEN_MAGIC 0x5e
#define STEERD_TOKEN_MAC_LEN 8
#define STEERD_TOKEN_MIN_LEN 18           /* magic + issued + odcid_len + MAC: odcid empty */
#define STEERD_TOKEN_MAX_LEN 38           /* with a 20-byte odcid */
#define STEERD_TOKEN_MAC_INPUT_MAX 67     /* 8 + 1 + 20 + 1 + 16 + 1 + 20 */
#define STEERD_SIPHASH_MAX_LEN 96         /* steerd_siphash24's bound (siphash.h) */
/* The Retry Integrity Tag (ghash.h): pseudo-packet bound, tables map value. */
#define STEERD_RETRY_PSEUDO_MAX 192

#endif /* STEERD_H */
