/* siphash.h: SipHash-2-4 (Aumasson & Bernstein, the reference algorithm, 64-bit output) for
 * BPF programs, inlined into the XDP and TC guard.
 *
 * Why SipHash: the Retry token MAC must be cheap both here and in Python (quic/token.py uses
 * the same function through the `siphash24` package), keyed (a 128-bit key derived from the
 * daemon secret), and a PRF on short inputs. HMAC-SHA256 would need SHA-256 in BPF; SipHash
 * is ~20 rounds of add-rotate-xor on four 64-bit words for a token.
 *
 * Key: k0 = the first 8 key bytes as a little-endian u64, k1 = the last 8 (the reference's
 * convention; quic.token.token_key_words gives both). Output: the 64-bit value; the token
 * carries it as 8 little-endian bytes (the reference's output bytes).
 *
 * The token MAC input (one canonical layout, built the same way by the kernel and by
 * quic/token.py; the lengths and bound are in steerd.h, STEERD_TOKEN_MAC_*):
 *   issued_ms u64 big-endian | odcid_len u8 | odcid (<= 20) | addr_len u8 (4 or 16) |
 *   client address (network order) | scid_len u8 | Retry SCID (<= 20)
 * At most STEERD_TOKEN_MAC_INPUT_MAX (67) bytes, under STEERD_SIPHASH_MAX_LEN.
 *
 * The buffer: `msg` must point at STEERD_SIPHASH_MAX_LEN readable bytes (declare it that
 * size, on the stack or in a map value); only msg[0..len) affect the result, the rest may be
 * anything, uninitialised stack included. Why: the verifier checks every read against the
 * worst case over `len`, and the final partial block is read whole (7 bytes) and masked
 * rather than byte by byte under `if (j < rem)`: each such branch was a verifier path, and
 * that cost 128k verified instructions where this costs ~21k (measured in the test harness).
 * Every read is at an offset that is a constant on its path, below STEERD_SIPHASH_MAX_LEN:
 * the block loop runs at most STEERD_SIPHASH_MAX_LEN / 8 times and reads the final partial
 * block in the iteration that finds it. `len` above the bound is clamped to it (callers
 * check their lengths; the token MAC input is at most STEERD_TOKEN_MAC_INPUT_MAX = 67).
 */
#ifndef STEERD_SIPHASH_H
#define STEERD_SIPHASH_H

#ifndef STEERD_SIPHASH_MAX_LEN
#define STEERD_SIPHASH_MAX_LEN 96
#endif

#define STEERD_ROTL64(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

#define STEERD_SIPROUND(v0, v1, v2, v3)                                     \
    do {                                                                    \
        v0 += v1; v1 = STEERD_ROTL64(v1, 13); v1 ^= v0; v0 = STEERD_ROTL64(v0, 32); \
        v2 += v3; v3 = STEERD_ROTL64(v3, 16); v3 ^= v2;                     \
        v0 += v3; v3 = STEERD_ROTL64(v3, 21); v3 ^= v0;                     \
        v2 += v1; v1 = STEERD_ROTL64(v1, 17); v1 ^= v2; v2 = STEERD_ROTL64(v2, 32); \
    } while (0)

/* SipHash-2-4 of msg[0..len) under (k0, k1). */
static __always_inline __u64 steerd_siphash24(__u64 k0, __u64 k1, const __u8 *msg, __u32 len)
{
    __u64 v0 = k0 ^ 0x736f6d6570736575ULL;
    __u64 v1 = k1 ^ 0x646f72616e646f6dULL;
    __u64 v2 = k0 ^ 0x6c7967656e657261ULL;
    __u64 v3 = k1 ^ 0x7465646279746573ULL;
    __u64 last;
    __u32 blocks, rem;

    if (len > STEERD_SIPHASH_MAX_LEN)
        len = STEERD_SIPHASH_MAX_LEN;
    blocks = len >> 3;
    rem = len & 7;
    /* The final block: the 0-7 trailing bytes, little-endian, and len mod 256 on top. If len
     * is a multiple of 8 up to the bound, no iteration finds it and it is just that byte. */
    last = (__u64)len << 56;
    for (__u32 i = 0; i < STEERD_SIPHASH_MAX_LEN / 8; i++) {
        const __u8 *p = msg + 8 * i;
        __u64 m = 0;

        if (i >= blocks) {
            /* Branch-free: read all 7 bytes (below the bound), keep the first rem. */
#pragma unroll
            for (__u32 j = 0; j < 7; j++)
                m |= (__u64)p[j] << (8 * j);
            last |= m & ((1ULL << (8 * rem)) - 1);
            break;
        }
#pragma unroll
        for (__u32 j = 0; j < 8; j++)
            m |= (__u64)p[j] << (8 * j);
        v3 ^= m;
        STEERD_SIPROUND(v0, v1, v2, v3);
        STEERD_SIPROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    v3 ^= last;
    STEERD_SIPROUND(v0, v1, v2, v3);
    STEERD_SIPROUND(v0, v1, v2, v3);
    v0 ^= last;
    v2 ^= 0xff;
    STEERD_SIPROUND(v0, v1, v2, v3);
    STEERD_SIPROUND(v0, v1, v2, v3);
    STEERD_SIPROUND(v0, v1, v2, v3);
    STEERD_SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

#endif /* STEERD_SIPHASH_H */
