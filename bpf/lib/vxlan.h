/* VXLAN: the checks every received tunnel packet must pass (shared by the XDP filter and
 * the tc decap, so that both agree on what is valid), encapsulation and decapsulation. */
#ifndef XO_VXLAN_H
#define XO_VXLAN_H

#include "common.h"
#include "parsing.h"
#include "maps.h"

/* struct xo_vxlanhdr's flags (lib/parsing.h). */
#define XO_VXLAN_FLAG_VNI 0x08
/* A bit RFC 7348 reserves (send 0, ignore on receipt), meaningful only between xoverlay
 * nodes: the frame belongs to a routing-mesh connection, whose client is outside every
 * overlay network (lib/mesh.h). Only our programs build VXLAN headers, so a container
 * cannot set it. */
#define XO_VXLAN_FLAG_MESH 0x01

/* The headers encap writes after the outer Ethernet header, in one store. */
struct xo_encap_headers {
    struct iphdr ip;
    struct udphdr udp;
    struct xo_vxlanhdr vxlan;
    struct ethhdr inner_eth;
} __attribute__((packed));

/* What a valid tunnel packet carries, for the caller. */
struct xo_tunnel {
    __be32 peer_ip;           /* outer source: the sending node */
    __u32 vni;
    struct ethhdr *inner_eth; /* NULL when the packet ends right after VXLAN */
    int mesh;                 /* XO_VXLAN_FLAG_MESH was set */
    __u32 peer_slot;          /* the sender's counters, if looked up (membership); else XO_NO_SLOT */
};

/* What xo_classify_underlay found, when it is no drop. */
enum xo_tunnel_kind {
    XO_VXLAN_OK = 0,          /* a valid tunnel packet from a peer */
    XO_NOT_VXLAN = 1,         /* not ours: let the stack have it */
};

/* One's complement sum of a 20-byte header: the checksum to write when its field is
 * zero, and 0 when checking a header whose checksum is right. */
static __always_inline __u16 xo_ipv4_csum(const struct iphdr *ip)
{
    __u32 sum = 0;
    const __u16 *p = (const __u16 *)ip;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
        sum += p[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* Classify a frame arriving on the underlay (`len`: the whole frame, which may be longer
 * than data_end - data). Returns XO_NOT_VXLAN, XO_VXLAN_OK (and fills *t), or -reason.
 * Malformed IPv4 and UDP are dropped whatever the port: the stack would drop them too,
 * and we cannot tell a truncated VXLAN packet apart.
 * `membership` (a constant at each call): also look the sender up in xo_peers and the
 * VNI in xo_vnis. Without it only the packet's own shape is judged; a caller that skips
 * them must prove both another way, and classify again with them to name a drop (the
 * reasons come in this order either way). */
static __always_inline int xo_classify_underlay(void *data, void *data_end, __u32 len,
                                                const struct xo_config *cfg,
                                                struct xo_tunnel *t, const int membership)
{
    struct xo_cursor c = { .pos = data, .end = data_end };
    struct ethhdr *eth;
    if (xo_parse_eth(&c, &eth) != bpf_htons(ETH_P_IP))
        return XO_NOT_VXLAN;

    struct iphdr *ip;
    int proto = xo_parse_ipv4(&c, &ip);
    if (proto < 0)
        return proto;
    if (proto != IPPROTO_UDP)
        return XO_NOT_VXLAN;
    /* A later fragment has no UDP header: nothing to judge, the stack reassembles. */
    if (ip->frag_off & bpf_htons(XO_IP_OFFSET))
        return XO_NOT_VXLAN;

    struct udphdr *udp;
    int dport = xo_parse_udp(&c, &udp);
    if (dport < 0)
        return dport;
    if (dport != cfg->vxlan_port || ip->daddr != cfg->node_ip)
        return XO_NOT_VXLAN;

    /* From here on it is addressed to our tunnel endpoint. */
    if (ip->frag_off & bpf_htons(XO_IP_MF))
        return -XO_DROP_OUTER_FRAGMENT;
    if (ip->ihl != 5)
        return -XO_DROP_OUTER_IP_OPTIONS;
    /* Decap hands the inner packet to the container past ip_rcv(), which would have
     * checked this: a corrupted outer header must not be believed. */
    if (xo_ipv4_csum(ip))
        return -XO_DROP_OUTER_CHECKSUM;
    if (bpf_ntohs(udp->len) < sizeof(*udp) + XO_VXLAN_HLEN + ETH_HLEN ||
        bpf_ntohs(ip->tot_len) < sizeof(*ip) + bpf_ntohs(udp->len))
        return -XO_DROP_TRUNCATED_UDP;

    struct xo_vxlanhdr *vx;
    int vnid = xo_parse_vxlan(&c, &vx);       /* the VNI, or -reason */
    if (vnid < 0)
        return vnid;
    if (!(vx->flags & XO_VXLAN_FLAG_VNI))
        return -XO_DROP_BAD_VXLAN_FLAGS;

    __be32 peer_ip = ip->saddr;
    __u32 vni = vnid;
    __u32 peer_slot = XO_NO_SLOT;
    if (membership) {
        struct xo_peer *peer = xo_peers.lookup(&peer_ip);
        if (!peer)
            return -XO_DROP_UNKNOWN_PEER;
        peer_slot = peer->slot;
        if (!xo_vnis.lookup(&vni))
            return -XO_DROP_UNKNOWN_VNI;
    }

    struct ethhdr *inner;
    if (xo_parse_eth(&c, &inner) < 0)
        return -XO_DROP_TRUNCATED_VXLAN;
    /* Headers all there, the rest cut short of the IPv4 total length: ip_rcv() would drop
     * it, and decap skips ip_rcv(); it would vanish, uncounted, in the container's stack. */
    if (bpf_ntohs(ip->tot_len) > len - ETH_HLEN)
        return -XO_DROP_TRUNCATED_UDP;

    t->peer_ip = peer_ip;
    t->vni = vni;
    t->mesh = vx->flags & XO_VXLAN_FLAG_MESH;
    t->peer_slot = peer_slot;
    t->inner_eth = inner;
    return XO_VXLAN_OK;
}

/* RFC 7348: the source port is a hash of the inner flow, so the underlay can spread
 * tunnels over paths. Same formula as the kernel's udp_flow_src_port(). */
static __always_inline __be16 xo_flow_sport(__u32 hash)
{
    return bpf_htons((((__u64)hash * (XO_SPORT_MAX - XO_SPORT_MIN)) >> 32) + XO_SPORT_MIN);
}

/* The headers VXLAN puts after the outer Ethernet header, for an inner IP packet of
 * inner_len bytes to dst_node; the source port from `hash` (xo_flow_hash of the inner
 * packet). Built field by field, checksum included, every byte written: it fills them in
 * place, in the packet (a helper's copy from the stack cost more than the rest of the
 * writes). tc and XDP encap both use it. */
static __always_inline void xo_encap_fill(struct xo_encap_headers *h, __be32 src_node, __be32 dst_node,
                                          __be16 vxlan_port, __u32 vni, __u32 hash, __u32 inner_len,
                                          __u8 flags, const __u8 *inner_src, const __u8 *inner_dst)
{
    h->ip.version = 4;
    h->ip.ihl = 5;
    h->ip.tos = 0;
    h->ip.id = 0;
    h->ip.ttl = 64;
    h->ip.protocol = IPPROTO_UDP;
    h->ip.frag_off = bpf_htons(XO_IP_DF);
    h->ip.tot_len = bpf_htons(XO_ENCAP_LEN + inner_len);
    h->ip.saddr = src_node;
    h->ip.daddr = dst_node;
    h->ip.check = 0;
    h->ip.check = xo_ipv4_csum(&h->ip);

    h->udp.source = xo_flow_sport(hash);
    h->udp.dest = vxlan_port;
    h->udp.len = bpf_htons(XO_ENCAP_LEN - sizeof(struct iphdr) + inner_len);
    h->udp.check = 0;         /* allowed for VXLAN over IPv4, and what Linux sends */

    h->vxlan.flags = XO_VXLAN_FLAG_VNI | flags;
    h->vxlan.reserved1[0] = h->vxlan.reserved1[1] = h->vxlan.reserved1[2] = 0;
    h->vxlan.vni_reserved2 = bpf_htonl(vni << 8);

    xo_mac_copy(h->inner_eth.h_dest, inner_dst);
    xo_mac_copy(h->inner_eth.h_source, inner_src);
    h->inner_eth.h_proto = bpf_htons(ETH_P_IP);
}

/* Wrap the frame at skb->data in Ethernet/IPv4/UDP/VXLAN to dst_node, the source port
 * from `hash` (xo_flow_hash of the inner packet), VXLAN flags | `flags`. The original
 * Ethernet header stays in front as the outer one (the neighbour code rewrites it on
 * transmit); the inner one is rebuilt from the arguments. Returns 0 or -reason. */
static __always_inline int xo_vxlan_encap(struct __sk_buff *skb, const struct xo_config *cfg,
                                          __be32 dst_node, __u32 vni, __u32 hash, __u8 flags,
                                          const __u8 *inner_src, const __u8 *inner_dst)
{
    __u32 inner_len = skb->len - ETH_HLEN;    /* inner IP packet */
    /* FIXED_GSO keeps the container's MSS (its MTU already leaves room); the ENCAP flags
     * tell GSO how to segment what is now a UDP tunnel packet with an inner Ethernet. */
    __u64 adj = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
                BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
                BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
    if (bpf_skb_adjust_room(skb, XO_ENCAP_LEN, BPF_ADJ_ROOM_MAC, adj))
        return -XO_DROP_ENCAP_FAILED;

    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct xo_encap_headers *h = data + ETH_HLEN;
    if ((void *)(h + 1) > data_end)
        return -XO_DROP_ENCAP_FAILED;
    xo_encap_fill(h, cfg->node_ip, dst_node, cfg->vxlan_port, vni, hash, inner_len, flags, inner_src, inner_dst);
    return 0;
}

/* Take off what encap put on: the outer IPv4, UDP and VXLAN headers and the inner
 * Ethernet header go; the outer Ethernet header stays, in front of the inner IP packet.
 * FIXED_GSO: the inner packet's segments stay the size they were sent at. Returns 0 or
 * -reason. */
static __always_inline int xo_vxlan_decap(struct __sk_buff *skb)
{
    if (bpf_skb_adjust_room(skb, -(__s32)XO_ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
        return -XO_DROP_DECAP_FAILED;
    return 0;
}

#endif
