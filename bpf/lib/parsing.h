/* Header parsing, as xdp-tutorial's common/parsing_helpers.h does it: one cursor walks the
 * packet, and every parser works the same way. It checks that its header lies inside the
 * packet, hands it back in *hdr, moves the cursor past it and returns what the header says
 * comes next (a protocol field, or the port or VNI that names the payload), all >= 0; a
 * header that is not all there returns a negative drop reason (-XO_DROP_*, lib/drop.h)
 * and leaves the cursor where it was. What is wrong with a header that is all there (a
 * fragment, options, a length field that disagrees) depends on who sent the packet, and
 * is the caller's to judge. XDP and tc both give us data/data_end: both use these. */
#ifndef XO_PARSING_H
#define XO_PARSING_H

#include <uapi/linux/tcp.h>

#include "common.h"
#include "drop.h"

struct xo_cursor {
    void *pos;
    void *end;
};

/* Ethernet. Returns the EtherType as on the wire (compare with bpf_htons(ETH_P_*)); a
 * frame too short for the header is not IPv4 either. */
static __always_inline int xo_parse_eth(struct xo_cursor *c, struct ethhdr **hdr)
{
    struct ethhdr *eth = c->pos;
    if ((void *)(eth + 1) > c->end)
        return -XO_DROP_NOT_IPV4;
    c->pos = eth + 1;
    *hdr = eth;
    return eth->h_proto;
}

/* ARP for IPv4 over Ethernet (RFC 826): the fixed header and the four addresses, the
 * only format a container's stack sends. Packed: spa follows the 6 bytes of sha, at
 * offset 14, where a plain struct would pad it to 16. */
struct xo_arphdr {
    __be16 htype;             /* XO_ARP_HTYPE_ETHER */
    __be16 ptype;             /* ETH_P_IP */
    __u8 hlen;                /* ETH_ALEN */
    __u8 plen;                /* 4 */
    __be16 op;                /* XO_ARP_REQUEST, XO_ARP_REPLY */
    __u8 sha[ETH_ALEN];       /* sender */
    __be32 spa;
    __u8 tha[ETH_ALEN];       /* target */
    __be32 tpa;
} __attribute__((packed));

#define XO_ARP_HTYPE_ETHER 1
#define XO_ARP_REQUEST 1
#define XO_ARP_REPLY 2

/* ARP, all 28 bytes of it. Returns the operation as on the wire; what the other fields
 * say is the caller's to check. */
static __always_inline int xo_parse_arp(struct xo_cursor *c, struct xo_arphdr **hdr)
{
    struct xo_arphdr *arp = c->pos;
    if ((void *)(arp + 1) > c->end)
        return -XO_DROP_ARP_NOT_ANSWERED;
    c->pos = arp + 1;
    *hdr = arp;
    return arp->op;
}

#define XO_IPV4_MAX_HLEN 60  /* IHL 15 */

/* IPv4: version 4, an IHL of at least 5 and the whole header, options too, inside the
 * packet; the cursor skips the options. Returns the protocol it carries. */
static __always_inline int xo_parse_ipv4(struct xo_cursor *c, struct iphdr **hdr)
{
    struct iphdr *ip = c->pos;
    if ((void *)(ip + 1) > c->end)
        return -XO_DROP_MALFORMED_IP;
    if (ip->version != 4 || ip->ihl < 5)
        return -XO_DROP_MALFORMED_IP;
    __u32 hlen = ip->ihl * 4;
    if (c->pos + hlen > c->end)
        return -XO_DROP_MALFORMED_IP;
    c->pos += hlen;
    *hdr = ip;
    return ip->protocol;
}

static __always_inline int xo_ipv4_is_fragment(const struct iphdr *ip)
{
    return ip->frag_off & bpf_htons(XO_IP_MF | XO_IP_OFFSET);
}

/* UDP. Returns the destination port as on the wire: what names the payload (VXLAN, on
 * ours). Its length field is the caller's to check. */
static __always_inline int xo_parse_udp(struct xo_cursor *c, struct udphdr **hdr)
{
    struct udphdr *udp = c->pos;
    if ((void *)(udp + 1) > c->end)
        return -XO_DROP_TRUNCATED_UDP;
    c->pos = udp + 1;
    *hdr = udp;
    return udp->dest;
}

/* TCP: its fixed 20 bytes (ports, sequence numbers, data offset, flags), all that we
 * read of it; the cursor moves past those only, as nothing reads options or payload.
 * Returns the destination port as on the wire. */
static __always_inline int xo_parse_tcp(struct xo_cursor *c, struct tcphdr **hdr)
{
    struct tcphdr *th = c->pos;
    if ((void *)(th + 1) > c->end)
        return -XO_DROP_MALFORMED_IP;
    c->pos = th + 1;
    *hdr = th;
    return th->dest;
}

struct xo_vxlanhdr {
    __u8 flags;               /* 0x08: the VNI is valid (RFC 7348) */
    __u8 reserved1[3];
    __be32 vni_reserved2;     /* VNI in the top 24 bits */
};

/* VXLAN (RFC 7348). Returns the VNI: the network of the inner frame. The flags are the
 * caller's to check (the monitor reports the VNI of a header with wrong ones). */
static __always_inline int xo_parse_vxlan(struct xo_cursor *c, struct xo_vxlanhdr **hdr)
{
    struct xo_vxlanhdr *vx = c->pos;
    if ((void *)(vx + 1) > c->end)
        return -XO_DROP_TRUNCATED_VXLAN;
    c->pos = vx + 1;
    *hdr = vx;
    return bpf_ntohl(vx->vni_reserved2) >> 8;
}

/* The ports of a TCP or UDP header: its first 4 bytes, which is all that some callers
 * need of a header that may be cut short after them. A look ahead, not a parse: the
 * cursor stays at the header. Returns the destination port as on the wire. */
struct xo_ports {
    __be16 source;
    __be16 dest;
};

static __always_inline int xo_peek_ports(const struct xo_cursor *c, struct xo_ports **hdr)
{
    struct xo_ports *ports = c->pos;
    if ((void *)(ports + 1) > c->end)
        return -XO_DROP_MALFORMED_IP;
    *hdr = ports;
    return ports->dest;
}

#define XO_TCP_FIN 0x01
#define XO_TCP_SYN 0x02
#define XO_TCP_RST 0x04
#define XO_TCP_ACK 0x10

/* A TCP or UDP packet's flow, and what a reset needs. */
struct xo_flow {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 tcp_flags;
    __u16 l4_off;             /* from the start of the frame */
    __be32 seq;               /* TCP */
    __be32 ack_seq;
    __u32 seg_len;            /* TCP payload length */
};

/* The flow of the IPv4 packet `ip`, the cursor at its L4 header (`data`: the start of the
 * frame, which offsets count from). Returns 1 and fills *f for an unfragmented TCP or
 * UDP packet whose header is there; 0 for any other packet, which has no flow (it is
 * not a drop). */
static __always_inline int xo_flow_parse(void *data, const struct iphdr *ip, struct xo_cursor c,
                                         struct xo_flow *f)
{
    if (xo_ipv4_is_fragment(ip))
        return 0;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->proto = ip->protocol;
    f->l4_off = c.pos - data;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *th;
        if (xo_parse_tcp(&c, &th) < 0)
            return 0;
        f->sport = th->source;
        f->dport = th->dest;
        f->tcp_flags = ((__u8 *)th)[13];
        f->seq = th->seq;
        f->ack_seq = th->ack_seq;
        __u32 headers = ip->ihl * 4 + th->doff * 4;
        __u32 total = bpf_ntohs(ip->tot_len);
        f->seg_len = total > headers ? total - headers : 0;
        return 1;
    }
    if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *uh;
        if (xo_parse_udp(&c, &uh) < 0)
            return 0;
        f->sport = uh->source;
        f->dport = uh->dest;
        return 1;
    }
    return 0;
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

#endif
