/* guard.c: the guard in front of the service port(s), at XDP (or TC ingress).
 *
 * Why in XDP: junk that RFC 9000 says a server must discard (Initials in datagrams under
 * 1200 bytes, datagrams too short to be QUIC, small datagrams of unknown versions) and
 * floods of new Initials are cheapest to drop before the kernel allocates an skb, and
 * counting each packet class here gives the daemon its traffic picture for free. The guard
 * only reads headers (no state but the optional flood buckets) and passes everything it does
 * not understand untouched: other ports, non-UDP, non-IP, IP fragments (a first fragment
 * to a service port is counted; later fragments carry no port and pass uncounted).
 * Since issue 19 it also answers token-less Initials with a Retry and checks the tokens
 * clients echo (see "Kernel Retry" below and docs/DATAPLANE.md).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>
#include "steerd.h"
#include "siphash.h"
#include "ghash.h"

#define GUARD_CONFIG ((void *)bpf_pseudo_fd(1, STEERD_FD_GUARD_CONFIG))
#define BUCKETS ((void *)bpf_pseudo_fd(1, STEERD_FD_FLOOD_BUCKETS))
#define GHASH_TABLES ((void *)bpf_pseudo_fd(1, STEERD_FD_GHASH_TABLES))
#define SCRATCH ((void *)bpf_pseudo_fd(1, STEERD_FD_GUARD_SCRATCH))

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

/* Verdicts of judge() (and initial()); RETRY: answer() turns the frame into a Retry. */
#define PASS 1
#define DROP 0
#define MORE 2   /* headers reach past what is linear: the TC entry pulls more and retries */
#define RETRY 3  /* a token-less Initial to answer: its fields are in guard_scratch */

#define FLOOD_OK 0
#define FLOOD_PREFIX 1   /* over the source prefix's budget */
#define FLOOD_TOTAL 2    /* over the budget of all prefixes together */

/* Mask ``key``'s address to the configured source prefix (its bucket). */
static __always_inline void mask_prefix(struct steerd_bucket_key *key,
                                        struct steerd_guard_config *cfg)
{
    __u32 bits = key->family == 4 ? cfg->v4_prefix_len : cfg->v6_prefix_len;

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
}

/* One step of the prefix's bucket ``kind`` (STEERD_BUCKET_*) in flood_buckets: 1 = within. */
static __always_inline int prefix_step(struct steerd_bucket_key *key, __u64 now,
                                       __u64 interval, __u64 burst)
{
    __u64 tat, *state = bpf_map_lookup_elem(BUCKETS, key);

    if (!state) {
        tat = now + interval;
        bpf_map_update_elem(BUCKETS, key, &tat, BPF_ANY);
        return 1;
    }
    return gcra(state, now, interval, burst);
}

/* The flood guard's verdict on one new Initial (or 0-RTT) from ``src``'s source. */
static __always_inline int flood_check(const struct steerd_bucket_key *src)
{
    __u32 zero = 0;
    struct steerd_guard_config *cfg = bpf_map_lookup_elem(GUARD_CONFIG, &zero);
    struct steerd_bucket_key key = *src;
    __u64 now;

    if (!cfg || !cfg->flood_enabled)
        return FLOOD_OK;
    mask_prefix(&key, cfg);
    key.pad[0] = STEERD_BUCKET_INITIAL;
    now = bpf_ktime_get_ns();
    if (!prefix_step(&key, now, cfg->interval_ns, cfg->burst_ns))
        return FLOOD_PREFIX;
    if (cfg->total_interval_ns &&
        !gcra(&cfg->total_tat_ns, now, cfg->total_interval_ns, cfg->total_burst_ns))
        return FLOOD_TOTAL;
    return FLOOD_OK;
}

/* The Retry's own budget (a Retry is smaller than the Initial that asked for it, but
 * without a bound steerd would reflect at line rate toward whoever the sources claim to be):
 * the source prefix's Retry bucket, then all prefixes together. */
static __always_inline int retry_budget(const struct steerd_bucket_key *src,
                                        struct steerd_guard_config *cfg, __u64 now)
{
    struct steerd_bucket_key key = *src;

    if (cfg->retry_interval_ns) {
        mask_prefix(&key, cfg);
        key.pad[0] = STEERD_BUCKET_RETRY;
        if (!prefix_step(&key, now, cfg->retry_interval_ns, cfg->retry_burst_ns))
            return FLOOD_PREFIX;
    }
    if (cfg->retry_total_interval_ns &&
        !gcra(&cfg->retry_total_tat_ns, now, cfg->retry_total_interval_ns,
              cfg->retry_total_burst_ns))
        return FLOOD_TOTAL;
    return FLOOD_OK;
}

/* Proven addresses (steerd_guard_config.proven_ttl_ns): the whole source address, in the
 * buckets' LRU map under its own kind, so a flood of new prefixes can only push them out
 * (their clients then meet a Retry again), never grow memory. */
static __always_inline void proven_key(struct steerd_bucket_key *key,
                                       const struct steerd_bucket_key *src)
{
    *key = *src;
    key->pad[0] = STEERD_BUCKET_PROVEN;
}

static __always_inline void prove(const struct steerd_bucket_key *src, __u64 until)
{
    struct steerd_bucket_key key;

    proven_key(&key, src);
    bpf_map_update_elem(BUCKETS, &key, &until, BPF_ANY);
}

/* 1: ``src`` is proven and within its budget of Initials that skip Retry mode. */
static __always_inline int proven(const struct steerd_bucket_key *src, __u64 now,
                                  const struct steerd_guard_config *cfg)
{
    struct steerd_bucket_key key;
    __u64 *until;

    proven_key(&key, src);
    until = bpf_map_lookup_elem(BUCKETS, &key);
    if (!until || now >= *until)
        return 0;
    key.pad[1] = 1;   /* its budget */
    return prefix_step(&key, now, cfg->proven_interval_ns, cfg->proven_burst_ns);
}

/* ---- Kernel Retry and token check (docs/DATAPLANE.md "Kernel Retry") -------------------
 *
 * Why here: under a flood of spoofed Initials every Initial that reaches Python costs a
 * first flight (~130 us of daemon CPU). A Retry needs no state and no AES (the integrity tag
 * is GHASH with published constants: ghash.h) and its token is a SipHash MAC (siphash.h), so
 * the guard answers token-less Initials itself and checks the tokens clients echo: only
 * clients that own their address reach the classifier.
 *
 * Scratch (guard_scratch, PERCPU_ARRAY of one): the Retry, its pseudo-packet and the MAC
 * input are built there (the 512-byte stack is too small for them and the two hash
 * functions), then the Retry is copied over the Initial in place. Every variable offset into
 * it is bounded by a CID length (<= 20), so fixed-size copies stay inside. */
struct retry_scratch {
    __u8 r[STEERD_RETRY_BUF];                /* the Retry (tag included) */
    __u8 pseudo[STEERD_RETRY_PSEUDO_MAX];    /* ODCID length, ODCID, the Retry without tag */
    __u8 mac[STEERD_SIPHASH_MAX_LEN];        /* the token MAC input */
    __u8 tag[16];
    __u8 scid[STEERD_RETRY_SCID_LEN];
    __u8 tok[STEERD_TOKEN_MAX_LEN + 2];      /* a token of ours, copied out of the packet */
    __u32 launder[2];                        /* see launder() */
    /* What judge() leaves for answer(): the Initial's CIDs, lengths, version, source. */
    __u8 dcid[STEERD_MAX_CID_LEN];
    __u8 cscid[STEERD_MAX_CID_LEN];
    __u32 dcid_len;
    __u32 scid_len;
    __u32 version;
    __u32 family;
    struct steerd_bucket_key client;
};

/* ``v`` as the verifier sees a number loaded from a map: unknown, linked to nothing, then
 * bounded by ``max``. Why: the hash functions fork once per block their length may have,
 * and a length derived from the CID lengths carries those forks into every register linked
 * to it, so no two paths look alike afterwards and the verifier explores their product
 * (more than a million instructions). Passing them a laundered length lets the paths merge
 * as soon as the hash returns. */
static __always_inline __u32 launder(struct retry_scratch *s, __u32 v, __u32 max)
{
    *(volatile __u32 *)&s->launder[0] = v;
    v = *(volatile __u32 *)&s->launder[0];
    return v > max ? max : v;
}

_Static_assert(sizeof(struct retry_scratch) == STEERD_GUARD_SCRATCH_SIZE, "guard_scratch size");

/* The MAC input after its first 9 + odcid_len bytes (already in s->mac): the client address
 * and the Retry SCID (quic/token.py mac_input). Returns the input's length. */
static __always_inline __u32 mac_binding(struct retry_scratch *s, __u32 off,
                                         const struct steerd_bucket_key *client,
                                         const __u8 *scid, __u32 scid_len)
{
    __u32 alen = client->family == 4 ? 4 : 16;

    s->mac[off] = alen;
    __builtin_memcpy(&s->mac[off + 1], client->addr, 16);
    off += 1 + alen;
    s->mac[off] = scid_len;
    __builtin_memcpy(&s->mac[off + 1], scid, STEERD_MAX_CID_LEN);
    return off + 1 + scid_len;
}

static __always_inline __u64 load_be64(const __u8 *p)
{
    __u64 v = 0;

#pragma unroll
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}


/* A token of ours (format checked by the caller: t[0] magic, length 18 + t[9], t[9] <= 20)
 * on an Initial with DCID ``dcid`` from ``client``: the counter of its verdict. ``t`` must have
 * STEERD_TOKEN_MAX_LEN readable bytes. */
static __always_inline __u32 check_token(const __u8 *t, const __u8 *dcid, __u32 dcid_len,
                                         const struct steerd_bucket_key *client,
                                         struct steerd_guard_config *cfg,
                                         struct retry_scratch *s, __u64 now)
{
    __u32 odcid_len, mlen;
    __u64 issued, now_ms;

    /* Out of the packet first: offsets into a map value may vary, into a packet they may not
     * without a bounds check for each. */
    __builtin_memcpy(s->tok, t, STEERD_TOKEN_MAX_LEN);
    odcid_len = s->tok[9];
    if (odcid_len > STEERD_MAX_CID_LEN)
        return STEERD_CNT_XDP_DROP_TOKEN_INVALID;
    /* issued_ms | odcid_len | odcid: the token's bytes after the magic (fixed 29: the rest
     * is overwritten by the binding). */
    __builtin_memcpy(s->mac, &s->tok[1], 9 + STEERD_MAX_CID_LEN);
    mlen = launder(s, mac_binding(s, 9 + odcid_len, client, dcid, dcid_len),
                   STEERD_TOKEN_MAC_INPUT_MAX);
    if (steerd_siphash24(cfg->token_k0, cfg->token_k1, s->mac, mlen) !=
        steerd_load_le64(&s->tok[10 + odcid_len]))
        return STEERD_CNT_XDP_DROP_TOKEN_INVALID;
    issued = load_be64(&s->tok[1]);
    now_ms = now / 1000000;
    /* 1 s of skew, as quic/token.py CLOCK_SKEW: the same clock, read a moment apart. */
    if (issued > now_ms + 1000 || now_ms - issued > cfg->token_lifetime_ms)
        return STEERD_CNT_XDP_DROP_TOKEN_EXPIRED;
    return STEERD_CNT_XDP_TOKEN_VALID;
}

/* Build the Retry for a token-less Initial in s->r: first byte, version, DCID = the client's
 * SCID, SCID = a fresh unroutable CID, the token, the integrity tag. ``dcid`` and ``scid``
 * (the Initial's) must have 20 readable bytes each. Returns the Retry's length, 0 if no tag
 * could be made (no GHASH tables: fall back to the classifier). */
static __always_inline __u32 build_retry(struct retry_scratch *s, __u32 version,
                                         const __u8 *dcid, __u32 dcid_len, const __u8 *scid,
                                         __u32 scid_len, const struct steerd_bucket_key *client,
                                         struct steerd_guard_config *cfg, __u64 now)
{
    __u64 issued = now / 1000000, mac;
    __u32 rnd = bpf_get_prandom_u32(), off, mlen, tok, rlen;

    /* Zero first: the fixed-size copies below leave nothing past the Retry's end, so the
     * checksum can sum the whole buffer without a branch per word. */
    __builtin_memset(s->r, 0, STEERD_RETRY_BUF);

    /* The new SCID: config rotation 0b111 and the length bits, as classifier._retry_cid. */
    s->scid[0] = (STEERD_CR_UNROUTABLE << STEERD_CONFIG_ROTATION_SHIFT) |
                 (STEERD_RETRY_SCID_LEN - 1);
#pragma unroll
    for (int i = 1; i < STEERD_RETRY_SCID_LEN; i += 4) {
        __u32 r = bpf_get_prandom_u32();

        s->scid[i] = r;
        if (i + 1 < STEERD_RETRY_SCID_LEN)
            s->scid[i + 1] = r >> 8;
        if (i + 2 < STEERD_RETRY_SCID_LEN)
            s->scid[i + 2] = r >> 16;
        if (i + 3 < STEERD_RETRY_SCID_LEN)
            s->scid[i + 3] = r >> 24;
    }
    /* The MAC input: issued | odcid_len | odcid | binding (the new SCID). */
#pragma unroll
    for (int i = 0; i < 8; i++)
        s->mac[i] = issued >> (56 - 8 * i);
    s->mac[8] = dcid_len;
    __builtin_memcpy(&s->mac[9], dcid, STEERD_MAX_CID_LEN);
    mlen = launder(s, mac_binding(s, 9 + dcid_len, client, s->scid, STEERD_RETRY_SCID_LEN),
                   STEERD_TOKEN_MAC_INPUT_MAX);
    mac = steerd_siphash24(cfg->token_k0, cfg->token_k1, s->mac, mlen);

    /* The Retry: RFC 9000 §17.2.5; type bits 0b11 (v1) or 0b00 (v2, RFC 9369), 4 unused
     * bits random. */
    s->r[0] = (version == STEERD_QUIC_V2 ? 0xc0 : 0xf0) | (rnd & 0x0f);
    s->r[1] = version >> 24;
    s->r[2] = version >> 16;
    s->r[3] = version >> 8;
    s->r[4] = version;
    s->r[5] = scid_len;
    __builtin_memcpy(&s->r[6], scid, STEERD_MAX_CID_LEN);
    off = 6 + scid_len;
    s->r[off] = STEERD_RETRY_SCID_LEN;
    __builtin_memcpy(&s->r[off + 1], s->scid, STEERD_RETRY_SCID_LEN);
    tok = off + 1 + STEERD_RETRY_SCID_LEN;
    /* The token: magic, then the MAC input's first 9 + odcid_len bytes, then the MAC. */
    s->r[tok] = STEERD_TOKEN_MAGIC;
    __builtin_memcpy(&s->r[tok + 1], s->mac, 9 + STEERD_MAX_CID_LEN);
    off = tok + 10 + dcid_len;
#pragma unroll
    for (int i = 0; i < 8; i++)
        s->r[off + i] = mac >> (8 * i);
    rlen = off + 8;
    /* The pseudo-packet: ODCID length, ODCID, the Retry so far. */
    s->pseudo[0] = dcid_len;
    __builtin_memcpy(&s->pseudo[1], dcid, STEERD_MAX_CID_LEN);
    __builtin_memcpy(&s->pseudo[1 + dcid_len], s->r, 88);   /* rlen <= 81 */
    if (steerd_retry_tag(GHASH_TABLES, version == STEERD_QUIC_V2 ? 1 : 0, s->pseudo,
                         launder(s, 1 + dcid_len + rlen, STEERD_RETRY_PSEUDO_MAX), s->tag) != 0)
        return 0;
    __builtin_memcpy(&s->r[rlen], s->tag, 16);
    return rlen + 16;
}

/* One's complement sum of the Retry's bytes (zero-padded to even). */
static __always_inline __u32 csum_retry(const struct retry_scratch *s, __u32 len)
{
    __u32 sum = 0;

    const __u32 *w = (const __u32 *)s->r;
    __u64 acc = 0;

    /* Native-order 32-bit words (one's complement sums do not care about byte order, RFC 1071
     * §2(B)): fold, then swap to the big-endian order the other parts are summed in. */
#pragma unroll
    for (int i = 0; i < STEERD_RETRY_BUF / 4; i++)
        acc += w[i];
    acc = (acc & 0xffffffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    sum = (__u32)acc;
    return ((sum & 0xff) << 8) | (sum >> 8);
}

static __always_inline __u32 csum_words(const void *p, __u32 words)
{
    const __u16 *w = p;
    __u32 sum = 0;

#pragma unroll
    for (int i = 0; i < 20; i++) {
        if (i < words)
            sum += bpf_ntohs(w[i]);
    }
    return sum;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* Turn the frame into the Retry in s->r (``len`` bytes) back to the client: swap MAC, IP
 * and UDP addresses, copy the Retry over the Initial, fix lengths and checksums. ``l3`` is
 * the frame's IP header (IPv4 without options, IPv6 with UDP next). Returns the new frame
 * length (the caller trims and transmits). */
static __always_inline __u32 rewrite_frame(struct ethhdr *eth, void *l3, __u32 family,
                                           struct udphdr *udp, __u8 *quic,
                                           const struct retry_scratch *s, __u32 len)
{
    __u8 mac[ETH_ALEN];
    __u16 port, ulen = sizeof(*udp) + len;
    __u32 sum;

    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    port = udp->source;
    udp->source = udp->dest;
    udp->dest = port;
    udp->len = bpf_htons(ulen);
    udp->check = 0;
    __builtin_memcpy(quic, s->r, STEERD_RETRY_BUF);
    sum = csum_retry(s, len) + IPPROTO_UDP + ulen + csum_words(udp, 4);
    if (family == 4) {
        struct iphdr *ip4 = l3;
        __be32 a = ip4->saddr;

        ip4->saddr = ip4->daddr;
        ip4->daddr = a;
        ip4->tot_len = bpf_htons(sizeof(*ip4) + ulen);
        ip4->id = 0;
        ip4->frag_off = bpf_htons(0x4000);   /* DF, as QUIC wants (RFC 9000 §14) */
        ip4->ttl = 64;
        ip4->check = 0;
        ip4->check = bpf_htons(csum_fold(csum_words(ip4, 10)));
        sum += csum_words(&ip4->saddr, 4);
    } else {
        struct ipv6hdr *ip6 = l3;
        struct in6_addr a = ip6->saddr;

        ip6->saddr = ip6->daddr;
        ip6->daddr = a;
        ip6->payload_len = bpf_htons(ulen);
        ip6->hop_limit = 64;
        sum += csum_words(&ip6->saddr, 16);
    }
    port = csum_fold(sum);
    udp->check = bpf_htons(port ? port : 0xffff);   /* 0 means "none": send all ones */
    /* In place means IPv4 without options or IPv6 with UDP next: the offsets are fixed. */
    return sizeof(*eth) + (family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) + ulen;
}

/* The verdict on a v1/v2 Initial in a datagram of >= 1200 bytes (``plen``, the UDP payload):
 * a token of ours is checked (MAC, age, address): invalid ones are dropped; a token-less one
 * (or one with someone else's token) is answered with a Retry while Retry mode is on; what
 * passes meets the flood guard as before. Reads only the first STEERD_RETRY_BUF bytes. */
static __always_inline int initial(void *data, void *end, struct ethhdr *eth,
                                   struct iphdr *ip4, struct ipv6hdr *ip6, int inplace,
                                   struct udphdr *udp, __u8 *quic, __u32 plen, __u32 version,
                                   const struct steerd_bucket_key *src)
{
    __u32 zero = 0, dcid_len, scid_len, vlen, at, verdict, len;
    struct steerd_guard_config *cfg;
    struct retry_scratch *s;
    __u8 *sl, *p, *t;
    __u64 now, tlen = 0;
    int flood, retry = 0;

    if ((void *)(quic + STEERD_RETRY_BUF) > end)
        return MORE;
    dcid_len = quic[5];
    if (dcid_len > STEERD_MAX_CID_LEN)
        return DROP;   /* the caller counted it */
    sl = quic + 6 + dcid_len;
    if ((void *)(sl + 1 + STEERD_MAX_CID_LEN) > end)
        return MORE;
    scid_len = sl[0];
    if (scid_len > STEERD_MAX_CID_LEN) {
        steerd_count(STEERD_CNT_XDP_DROP_INITIAL_MALFORMED);
        return DROP;
    }
    p = sl + 1 + scid_len;   /* the token length, a varint */
    if ((void *)(p + 8 + STEERD_TOKEN_MAX_LEN) > end)
        return MORE;
    vlen = 1 << (p[0] >> 6);
    /* The verifier cannot bound a variable shift: bound it again where clang cannot drop it. */
    asm volatile("" : "+r"(vlen));
    if (vlen > 8)
        return DROP;
    tlen = p[0] & 0x3f;
#pragma unroll
    for (int i = 1; i < 8; i++) {
        if (i < vlen)
            tlen = (tlen << 8) | p[i];
    }
    at = (__u32)(p - quic) + vlen;
    if (tlen > plen || at + tlen > plen) {
        steerd_count(STEERD_CNT_XDP_DROP_INITIAL_MALFORMED);
        return DROP;
    }
    t = p + vlen;
    if ((void *)(t + STEERD_TOKEN_MAX_LEN) > end)
        return MORE;
    cfg = bpf_map_lookup_elem(GUARD_CONFIG, &zero);
    now = bpf_ktime_get_ns();
    if (tlen == 0) {
        retry = 1;
    } else if (t[0] == STEERD_TOKEN_MAGIC && t[9] <= STEERD_MAX_CID_LEN &&
               tlen == STEERD_TOKEN_MIN_LEN + t[9]) {
        s = bpf_map_lookup_elem(SCRATCH, &zero);
        if (!cfg || !cfg->token_check || !s) {
            steerd_count(STEERD_CNT_XDP_TOKEN_UNCHECKED);
        } else {
            verdict = check_token(t, quic + 6, dcid_len, src, cfg, s, now);
            steerd_count(verdict);
            if (verdict != STEERD_CNT_XDP_TOKEN_VALID)
                return DROP;
            if (cfg->proven_ttl_ns)   /* it received our Retry at this address */
                prove(src, now + cfg->proven_ttl_ns);
        }
    } else {
        /* Someone else's token (an app's NEW_TOKEN): it passes, unless Retry mode is on. Then
         * it is answered like a token-less Initial (RFC 9000 §8.1.3 allows a Retry for a
         * token the server cannot validate), or junk tokens would carry a flood past the
         * Retry to the classifier, which would Retry it anyway, at Python's cost. */
        steerd_count(STEERD_CNT_XDP_TOKEN_OTHER);
        retry = 1;
    }
    /* "auto": token-less Initials over their rate turn Retry mode on here and now, before
     * the flood reaches Python (the daemon also turns it on when its classifiers fall
     * behind). The estimate spends nothing when over: it measures the offered rate. */
    if (retry && cfg && cfg->auto_hold_ns &&
        !gcra(&cfg->auto_tat_ns, now, cfg->auto_interval_ns, cfg->auto_burst_ns)) {
        if (cfg->retry_until_ns != STEERD_RETRY_ALWAYS)
            cfg->retry_until_ns = now + cfg->auto_hold_ns;
        steerd_count(STEERD_CNT_XDP_RETRY_AUTO);
    }
    if (retry && cfg && now < cfg->retry_until_ns && cfg->proven_ttl_ns && proven(src, now, cfg)) {
        steerd_count(STEERD_CNT_XDP_RETRY_PROVEN);
        retry = 0;   /* on to the flood guard, whose prefix budget still bounds it */
    }
    if (retry && cfg && now < cfg->retry_until_ns) {
        s = bpf_map_lookup_elem(SCRATCH, &zero);
        if (!inplace || !s || !cfg->token_check) {
            steerd_count(STEERD_CNT_XDP_RETRY_FALLBACK);
        } else {
            flood = retry_budget(src, cfg, now);
            if (flood != FLOOD_OK) {
                steerd_count(flood == FLOOD_PREFIX ? STEERD_CNT_XDP_RETRY_RATE_LIMITED
                                                   : STEERD_CNT_XDP_RETRY_RATE_LIMITED_TOTAL);
                return DROP;
            }
            /* The Retry is built by answer(), after judge() returns: there every path
             * through the parsing has merged into one verifier state, so the hash functions'
             * own forks are explored once, not once per parsing path. */
            __builtin_memcpy(s->dcid, quic + 6, STEERD_MAX_CID_LEN);
            __builtin_memcpy(s->cscid, sl + 1, STEERD_MAX_CID_LEN);
            s->dcid_len = dcid_len;
            s->scid_len = scid_len;
            s->version = version;
            s->family = ip4 ? 4 : 6;
            s->client = *src;
            return RETRY;
        }
    }
    flood = flood_check(src);
    if (flood != FLOOD_OK) {
        steerd_count(flood == FLOOD_PREFIX ? STEERD_CNT_XDP_DROP_RATE_LIMITED
                                           : STEERD_CNT_XDP_DROP_RATE_LIMITED_TOTAL);
        return DROP;
    }
    steerd_count(STEERD_CNT_XDP_INITIAL);
    return PASS;
}

/* The verdict on one Ethernet frame: PASS, DROP or RETRY. Shared by the XDP and the TC entry
 * points, so both attachments judge and count identically. */
static __always_inline int judge(void *data, void *end)
{
    struct ethhdr *eth = data;
    struct steerd_bucket_key src = {};
    struct iphdr *ip4 = NULL;
    struct ipv6hdr *ip6 = NULL;
    int inplace = 0;   /* the verifier refuses "ip4 || ip6" compiled as an OR of pointers */
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
        if (ip->ihl == 5) {
            ip4 = ip;   /* a Retry can be built in place (no options to drop) */
            inplace = 1;
        }
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *hdr6 = (void *)(eth + 1);
        __u8 *hdr = (void *)(hdr6 + 1);
        __u8 next;
        int fragment = 0;

        if ((void *)(hdr6 + 1) > end)
            return MORE;
        next = hdr6->nexthdr;
#pragma unroll
        for (int i = 0; i < STEERD_MAX_IPV6_EXT_HEADERS; i++) {
            /* One register for hdr: clang must not re-derive it for the read after the
             * bounds check (the verifier only trusts the pointer it checked). */
            asm volatile("" : "+r"(hdr));
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
        __builtin_memcpy(src.addr, &hdr6->saddr, 16);
        if ((void *)udp == (void *)(hdr6 + 1)) {
            ip6 = hdr6;   /* no extension headers: a Retry can be built in place */
            inplace = 1;
        }
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
        return initial(data, end, eth, ip4, ip6, inplace, udp, quic, plen, version, &src);
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

/* Turn the frame judge() found to be a token-less Initial (RETRY; its fields in
 * guard_scratch) into the Retry back to its sender. Returns the new frame length, 0 if it
 * cannot (no scratch, no GHASH tables, headers not where judge() saw them): the frame is then
 * untouched and goes up to the classifier. */
static __always_inline __u32 answer(void *data, void *end)
{
    __u32 zero = 0, dcid_len, scid_len, family, len;
    struct retry_scratch *s = bpf_map_lookup_elem(SCRATCH, &zero);
    struct steerd_guard_config *cfg = bpf_map_lookup_elem(GUARD_CONFIG, &zero);
    struct ethhdr *eth = data;
    struct udphdr *udp;
    __u8 *quic;

    if (!s || !cfg)
        return 0;
    dcid_len = s->dcid_len;
    scid_len = s->scid_len;
    family = s->family;
    if (dcid_len > STEERD_MAX_CID_LEN || scid_len > STEERD_MAX_CID_LEN)
        return 0;
    udp = (void *)(eth + 1) + (family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
    quic = (void *)(udp + 1);
    if ((void *)(quic + STEERD_RETRY_BUF) > end)
        return 0;
    len = build_retry(s, s->version, s->dcid, dcid_len, s->cscid, scid_len, &s->client, cfg,
                      bpf_ktime_get_ns());
    if (!len)
        return 0;
    return rewrite_frame(eth, eth + 1, family, udp, quic, s, len);
}

int steerd_guard(struct xdp_md *ctx)
{
    int verdict = judge((void *)(long)ctx->data, (void *)(long)ctx->data_end);
    __u32 len;

    /* XDP sees the whole frame linear: MORE only means truncated, which the stack drops. */
    if (verdict == RETRY) {
        len = answer((void *)(long)ctx->data, (void *)(long)ctx->data_end);
        if (!len) {
            steerd_count(STEERD_CNT_XDP_RETRY_FALLBACK);
            return XDP_PASS;
        }
        if (bpf_xdp_adjust_tail(ctx, (int)len - (int)bpf_xdp_get_buff_len(ctx)) != 0) {
            steerd_count(STEERD_CNT_XDP_DROP_RETRY_FAILED);
            return XDP_DROP;
        }
        steerd_count(STEERD_CNT_XDP_RETRY_SENT);
        return XDP_TX;   /* back out the interface it came in on */
    }
    return verdict == DROP ? XDP_DROP : XDP_PASS;
}

/* The same guard at TC ingress (tcx), for interfaces where native XDP is expensive: on veth
 * any native XDP program makes the kernel copy each locally built skb into a page with XDP
 * headroom, while TC sees the skb as it is. The headers the guard reads are pulled into the
 * linear area first (a no-op when they already are). A Retry leaves by bpf_redirect to the
 * egress of the interface the Initial came in on (TC cannot XDP_TX). */
int steerd_guard_tc(struct __sk_buff *skb)
{
    __u32 want = skb->len < STEERD_TC_PULL_LEN ? skb->len : STEERD_TC_PULL_LEN, len;
    int verdict;

    if ((long)skb->data_end - (long)skb->data < want)
        bpf_skb_pull_data(skb, want);
    verdict = judge((void *)(long)skb->data, (void *)(long)skb->data_end);
    if (verdict == MORE) {
        want = skb->len < STEERD_TC_PULL_MAX ? skb->len : STEERD_TC_PULL_MAX;
        bpf_skb_pull_data(skb, want);
        verdict = judge((void *)(long)skb->data, (void *)(long)skb->data_end);
    }
    if (verdict == RETRY) {
        len = answer((void *)(long)skb->data, (void *)(long)skb->data_end);
        if (!len) {
            steerd_count(STEERD_CNT_XDP_RETRY_FALLBACK);
            return TC_ACT_OK;
        }
        if (bpf_skb_change_tail(skb, len, 0) != 0) {
            steerd_count(STEERD_CNT_XDP_DROP_RETRY_FAILED);
            return TC_ACT_SHOT;
        }
        steerd_count(STEERD_CNT_XDP_RETRY_SENT);
        return bpf_redirect(skb->ifindex, 0);
    }
    return verdict == DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
