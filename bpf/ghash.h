/* ghash.h: the QUIC Retry Integrity Tag (RFC 9001 §5.8; RFC 9369 §3.3.3 for v2) in BPF,
 * without AES.
 *
 * Why it works: the tag is AES-128-GCM under a published key and nonce with an empty
 * plaintext and the Retry pseudo-packet as associated data, so
 *     tag = E_K(J0) XOR GHASH_H(A = pseudo-packet, C = empty),
 * with H = E_K(0^128) and E_K(J0) constants of the version. GHASH needs only multiplications
 * by the constant H in GF(2^128); these are linear over GF(2), so they are table lookups:
 * X * H = XOR over the 16 bytes i of X of T[i][X[i]], where T[i][b] is the product with H
 * of the block whose only non-zero byte is byte i = b. quic/ghash.py computes the tables in
 * user space (retry_ghash_tables(); ghash_table_value(version)) and the daemon writes them
 * into the map below; tests/dataplane/test_retry_crypto.py checks this code against
 * `cryptography`'s AESGCM.
 *
 * The map (`tables_map`): BPF_MAP_TYPE_ARRAY, key u32 = version index (0 = QUIC v1,
 * 1 = QUIC v2; quic.ghash.VERSION_INDEX), STEERD_GHASH_VERSIONS entries, value
 * struct steerd_ghash_tables (STEERD_GHASH_VALUE_SIZE = 65552 bytes). Every 16-byte entry is
 * in GHASH byte order (the block as on the wire); this code reads it as two native 64-bit
 * words and keeps X the same way (byte k of X = byte k of the memory), so XOR of words is
 * XOR of bytes. That needs a little-endian BPF target (bpfel, as on x86 and arm64).
 *
 * Why one 64 KiB value per version rather than one entry per row: one map lookup per tag,
 * then 16 bounded variable-offset loads per block (offset = const + byte * 16, the verifier
 * proves it inside the value), instead of 16 helper calls per block.
 *
 * The buffers: `pseudo` must point at STEERD_RETRY_PSEUDO_MAX readable bytes (declare it
 * that size, on the stack or in a map value); only pseudo[0..len) affect the tag. Every read
 * is at an offset that is a constant on its path, below STEERD_RETRY_PSEUDO_MAX: the block
 * loop runs at most STEERD_RETRY_PSEUDO_MAX / 16 times and reads the final partial block in
 * the iteration that finds it, whole, then masks it (no branch per byte: fewer verifier
 * paths, ~8k verified instructions in the test harness). `tag` gets 16 bytes, written one by
 * one (stack, map value, or packet bytes the caller has bounds-checked).
 */
#ifndef STEERD_GHASH_H
#define STEERD_GHASH_H
/* Needs steerd.h first (steerd_load_le64, the table layout's sizes), as every user has it. */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ghash.h keeps GHASH blocks as little-endian words"
#endif

#ifndef STEERD_RETRY_PSEUDO_MAX
#define STEERD_RETRY_PSEUDO_MAX 192   /* a multiple of 16 */
#endif
#define STEERD_GHASH_VERSIONS 2
#define STEERD_GHASH_VALUE_SIZE 65552

struct steerd_ghash_tables {
    __u64 t[16][256][2];              /* T[i][b], GHASH byte order */
    __u8 ekj0[16];                    /* E_K(J0) */
};                                    /* 65552 bytes */


/* (x0, x1) = (x0, x1) * H, through the tables. */
static __always_inline void steerd_ghash_mul(const struct steerd_ghash_tables *tb, __u64 *x0,
                                             __u64 *x1)
{
    __u64 a = *x0, b = *x1, y0 = 0, y1 = 0;

#pragma unroll
    for (int i = 0; i < 8; i++) {
        const __u64 *e = tb->t[i][(a >> (8 * i)) & 0xff];

        y0 ^= e[0];
        y1 ^= e[1];
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const __u64 *e = tb->t[8 + i][(b >> (8 * i)) & 0xff];

        y0 ^= e[0];
        y1 ^= e[1];
    }
    *x0 = y0;
    *x1 = y1;
}

/* The Retry Integrity Tag of the pseudo-packet pseudo[0..len) (ODCID length, ODCID, the
 * Retry packet without its tag) for the version at `version_index`, into tag[0..16).
 * Returns 0, or -1 if len exceeds STEERD_RETRY_PSEUDO_MAX or the map has no such entry. */
static __always_inline int steerd_retry_tag(void *tables_map, __u32 version_index,
                                            const __u8 *pseudo, __u32 len, __u8 tag[16])
{
    const struct steerd_ghash_tables *tb;
    __u64 x0 = 0, x1 = 0;
    __u32 blocks, rem;

    if (len > STEERD_RETRY_PSEUDO_MAX)
        return -1;
    tb = bpf_map_lookup_elem(tables_map, &version_index);
    if (!tb)
        return -1;
    blocks = len >> 4;
    rem = len & 15;
    for (__u32 i = 0; i < STEERD_RETRY_PSEUDO_MAX / 16; i++) {
        const __u8 *p = pseudo + 16 * i;

        if (i >= blocks) {
            if (rem) {
                /* The last, partial block, zero-padded: its 15 bytes read (below the bound)
                 * and masked to rem, without a branch per byte (each would be a path for
                 * the verifier). */
                __u64 w0 = steerd_load_le64(p), w1 = 0;

#pragma unroll
                for (__u32 j = 0; j < 7; j++)
                    w1 |= (__u64)p[8 + j] << (8 * j);
                if (rem < 8) {
                    w0 &= (1ULL << (8 * rem)) - 1;
                    w1 = 0;
                } else {
                    w1 &= (1ULL << (8 * (rem - 8))) - 1;
                }
                x0 ^= w0;
                x1 ^= w1;
                steerd_ghash_mul(tb, &x0, &x1);
            }
            break;
        }
        x0 ^= steerd_load_le64(p);
        x1 ^= steerd_load_le64(p + 8);
        steerd_ghash_mul(tb, &x0, &x1);
    }
    /* The length block: bit length of A as 64 bits big-endian, then 0 (C is empty). */
    x0 ^= __builtin_bswap64((__u64)len * 8);
    steerd_ghash_mul(tb, &x0, &x1);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        tag[j] = (__u8)(x0 >> (8 * j)) ^ tb->ekj0[j];
        tag[8 + j] = (__u8)(x1 >> (8 * j)) ^ tb->ekj0[8 + j];
    }
    return 0;
}

#endif /* STEERD_GHASH_H */
