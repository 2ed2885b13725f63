/* Checksums updated by hand: RFC 1624, HC' = ~(~HC + ~m + m'). XDP has no checksum
 * helpers; tc uses these for what is always a full checksum (the IPv4 header's), where
 * a helper call costs more than the arithmetic. */
#ifndef XO_CSUM_H
#define XO_CSUM_H

#include "common.h"

static __always_inline __u16 xo_csum_fold(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return sum;
}

/* Words are summed as they lie in memory (RFC 1071: byte order does not matter). */
static __always_inline void xo_csum_replace4(__u16 *check, __be32 from, __be32 to)
{
    __u32 sum = (__u16)~*check;
    sum += (__u16)~(from & 0xffff) + (__u16)~(from >> 16) + (to & 0xffff) + (to >> 16);
    *check = ~xo_csum_fold(sum);
}

static __always_inline void xo_csum_replace2(__u16 *check, __be16 from, __be16 to)
{
    __u32 sum = (__u16)~*check;
    sum += (__u16)~from + to;
    *check = ~xo_csum_fold(sum);
}

/* What the L4 checksum field of a CHECKSUM_PARTIAL packet holds (the kernel's
 * tcp_v4_send_check, udp4_hwcsum): the pseudo-header's sum, folded, not complemented.
 * An IPv4 header without options. */
static __always_inline __u16 xo_pseudo_header_csum(const struct iphdr *ip)
{
    __u32 sum = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) + (ip->daddr >> 16) +
                bpf_htons((__u16)ip->protocol) + bpf_htons((__u16)(bpf_ntohs(ip->tot_len) - sizeof(*ip)));
    return xo_csum_fold(sum);
}

#endif
