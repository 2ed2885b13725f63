/* Header parsing, xdp-tutorial style: a cursor walks the packet, each parser checks its
 * own bounds and returns the header (or NULL when the packet is too short). Works on
 * both XDP and tc, which both give us data/data_end. */
#ifndef XO_PARSING_H
#define XO_PARSING_H

#include "common.h"

struct xo_cursor {
    void *pos;
    void *end;
};

static __always_inline struct ethhdr *xo_parse_eth(struct xo_cursor *c)
{
    struct ethhdr *eth = c->pos;
    if ((void *)(eth + 1) > c->end)
        return NULL;
    c->pos = eth + 1;
    return eth;
}

#define XO_IPV4_MAX_HLEN 60  /* IHL 15 */

/* IPv4 header with a sane IHL, entirely inside the packet. Options are skipped. */
static __always_inline struct iphdr *xo_parse_ipv4(struct xo_cursor *c)
{
    struct iphdr *ip = c->pos;
    if ((void *)(ip + 1) > c->end)
        return NULL;
    if (ip->version != 4 || ip->ihl < 5)
        return NULL;
    __u32 hlen = ip->ihl * 4;
    if (c->pos + hlen > c->end)
        return NULL;
    c->pos += hlen;
    return ip;
}

static __always_inline struct udphdr *xo_parse_udp(struct xo_cursor *c)
{
    struct udphdr *udp = c->pos;
    if ((void *)(udp + 1) > c->end)
        return NULL;
    c->pos = udp + 1;
    return udp;
}

/* The ports of a TCP or UDP header: the first 4 bytes of both. */
struct xo_ports {
    __be16 source;
    __be16 dest;
};

static __always_inline struct xo_ports *xo_parse_ports(struct xo_cursor *c)
{
    struct xo_ports *ports = c->pos;
    if ((void *)(ports + 1) > c->end)
        return NULL;
    return ports;
}

static __always_inline int xo_ipv4_is_fragment(const struct iphdr *ip)
{
    return ip->frag_off & bpf_htons(XO_IP_MF | XO_IP_OFFSET);
}

static __always_inline int xo_mac_equal(const __u8 *a, const __u8 *b)
{
    return ((const __u16 *)a)[0] == ((const __u16 *)b)[0] &&
           ((const __u16 *)a)[1] == ((const __u16 *)b)[1] &&
           ((const __u16 *)a)[2] == ((const __u16 *)b)[2];
}

/* murmur3's finalizer: every input bit moves every output bit. */
static __always_inline __u32 xo_mix32(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

/* A hash of the IPv4 flow (addresses, protocol, L4 ports), for the VXLAN source port.
 * Ours rather than bpf_get_hash_recalc(): packets from a UDP socket carry no hash, and
 * the kernel's flow dissector costs more than the rest of encap together (measured).
 * Fragments hash on addresses only, so all pieces of a datagram take one path. */
static __always_inline __u32 xo_flow_hash(const struct iphdr *ip, void *data_end)
{
    __u32 ports = 0;
    if (!xo_ipv4_is_fragment(ip) && (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP)) {
        __u32 *l4 = (void *)ip + (ip->ihl & 0xf) * 4;
        if ((void *)(l4 + 1) <= data_end)
            ports = *l4;
    }
    return xo_mix32((ip->saddr * 0xcc9e2d51) ^ ((ip->daddr ^ (ports * 0x1b873593)) + ip->protocol));
}

static __always_inline void xo_mac_copy(__u8 *dst, const __u8 *src)
{
    __builtin_memcpy(dst, src, ETH_ALEN);
}

#endif
