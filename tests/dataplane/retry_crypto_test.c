/* retry_crypto_test.c: a test-only harness around bpf/siphash.h and ghash.h, run with
 * BPF_PROG_TEST_RUN by tests/dataplane/test_retry_crypto.py.
 *
 * Why a harness: the guard inlines these functions deep in its XDP and TC programs, where a
 * wrong byte only shows as a Retry the client drops. Here each call is fed an input from
 * the test packet and its output is written back into the packet, so Python can compare it
 * with the `siphash24` package and `cryptography`'s AESGCM. The XDP program hashes from a
 * stack buffer, the TC program from a map value (the two places the headers promise to read
 * from), so both program types and both memory kinds pass the verifier.
 *
 * Packet (in):  [0, 16) output | 16 op | 17 len | 18 version index | 19 status |
 *               20 k0 (LE u64) | 28 k1 (LE u64) | 36 input (len bytes, then junk to 36 + 192)
 * Packet (out): [0, 16) output (SipHash: 8 LE bytes; tag: 16; ktime: 8 LE bytes),
 *               19 status (0 ok; 1 tag returned non-zero; 0xee harness error). The input
 *               stays as it was, so a repeated test run repeats the same call.
 * -D flags: TEST_FD_TABLES (the GHASH tables ARRAY), TEST_FD_SCRATCH (ARRAY, 1 x 256 bytes).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "steerd.h"
#include "siphash.h"
#include "ghash.h"

#define OP_NONE 0
#define OP_SIPHASH 1
#define OP_TAG 2
#define OP_KTIME 3
#define IN_OFF 36
#define BUF_MAX STEERD_RETRY_PSEUDO_MAX

struct scratch {
    __u8 buf[BUF_MAX];
    __u8 tag[16];
    __u8 pad[48];
};


static __always_inline void put_le64(__u8 *p, __u64 w)
{
#pragma unroll
    for (int j = 0; j < 8; j++)
        p[j] = (__u8)(w >> (8 * j));
}

/* The harness on packet p, with the BUF_MAX input bytes already in buf (the packet is always
 * IN_OFF + BUF_MAX long; bytes past `len` are junk the functions must not read). */
static __always_inline void run(__u8 *p, void *data_end, const __u8 *buf, __u8 *tag)
{
    __u32 len, vi;
    __u64 k0, k1;
    __u8 op;

    if ((void *)(p + IN_OFF) > data_end)
        return;
    op = p[16];
    len = p[17];
    vi = p[18];
    k0 = steerd_load_le64(p + 20);
    k1 = steerd_load_le64(p + 28);
    p[19] = 0xee;
    if (op == OP_SIPHASH) {
        put_le64(p, steerd_siphash24(k0, k1, buf, len));
    } else if (op == OP_TAG) {
        if (steerd_retry_tag((void *)bpf_pseudo_fd(1, TEST_FD_TABLES), vi, buf, len, tag)) {
            p[19] = 1;
            return;
        }
        put_le64(p, steerd_load_le64(tag));
        put_le64(p + 8, steerd_load_le64(tag + 8));
    } else if (op == OP_KTIME) {
        put_le64(p, bpf_ktime_get_ns());
    }
    p[19] = 0;
}

/* XDP: the input on the stack. */
int xdp_crypto(struct xdp_md *ctx)
{
    __u8 buf[BUF_MAX];
    __u8 tag[16];

    if (bpf_xdp_load_bytes(ctx, IN_OFF, buf, sizeof(buf)))
        return XDP_ABORTED;
    run((__u8 *)(long)ctx->data, (void *)(long)ctx->data_end, buf, tag);
    return XDP_PASS;
}

/* TC: the input and the tag in a map value. */
int tc_crypto(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct scratch *s = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, TEST_FD_SCRATCH), &zero);

    if (!s || bpf_skb_load_bytes(skb, IN_OFF, s->buf, sizeof(s->buf)))
        return TC_ACT_SHOT;
    run((__u8 *)(long)skb->data, (void *)(long)skb->data_end, s->buf, s->tag);
    return TC_ACT_OK;
}
