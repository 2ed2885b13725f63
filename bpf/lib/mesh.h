/* The routing mesh: a service's published port answers on every node's underlay IP.
 *
 *   client (outside) -> node A IP:published   XDP on A's underlay (underlay_xdp.c):
 *                                               Maglev + connection table, as east-west;
 *       backend on another node B: DNAT, VXLAN built here (bpf_xdp_adjust_head), XDP_TX
 *       backend on A itself:       XDP_PASS; tc on the underlay (underlay_tc.c) does
 *                                   the same choice, DNAT and redirect_peer into it
 *       (without XDP, or when A has no neighbour entry for B yet: all of it in tc)
 *   B decaps (mesh flag in VXLAN): remembers "replies of this connection go to A"
 *   (XO_CT_MESH) and hands the packet to the backend with the client's own address
 *   backend's reply (endpoint.c on B): to an address outside every overlay, with a
 *       XO_CT_MESH entry: VXLAN back to A (mesh flag)
 *   A decaps it (underlay_tc.c): XO_CT_REPLY gives the source the client talked to,
 *       A IP:published; out of A's underlay to the client (redirect_neigh)
 *
 *   A itself as the client (its own published ports, on its IP or on 127.0.0.1: the
 *   agent's nftables table turns the latter into the former): the request is seen on
 *   A's loopback (loopback.c) and takes the tc path above; its replies, addressed to
 *   A IP, go into A's stack through lo instead of out of the underlay (xo_mesh_reply_out)
 *
 * Replies go back through the node the client talked to (not DSR): see docs/SERVICES.md. */
#ifndef XO_MESH_H
#define XO_MESH_H

#include "common.h"
#include "csum.h"
#include "maps.h"
#include "counters.h"
#include "monitor.h"
#include "parsing.h"
#include "vxlan.h"
#include "lb.h"
#include "route.h"
#include "deliver.h"

/* From xo_mesh_tc and xo_mesh_reply: not a routing-mesh packet, carry on. A verdict that
 * neither gives a mesh packet (it is redirected or dropped), and on the underlay what
 * lets the stack have the packet. */
#define XO_MESH_NOT_MESH TC_ACT_OK

/* Replies to the node itself enter its stack through lo, marked so that loopback.c lets
 * them through rather than taking one whose destination port is also published for a
 * request. The mark lives from the redirect to loopback.c, which clears it. */
#define XO_LOOPBACK_IFINDEX 1          /* lo, in every network namespace */
#define XO_MARK_MESH_REPLY 0x786f6d72  /* "xomr" */

/* The mesh parses the packet afresh. Without this, clang shares the headers parsed by
 * xo_classify_underlay (on the path where it found no VXLAN, nothing in between writes
 * memory), which keeps them in registers through all of it: the valid tunnel packet's
 * path then spills and took 7% longer in XDP (BPF_PROG_TEST_RUN, measured). */
#define xo_reparse_barrier() asm volatile("" ::: "memory")

/* A packet on the underlay for this node's IP, TCP or UDP, on a published port: its
 * flow in *f and its published port's entry (NULL: not for the mesh). */
static __always_inline struct xo_mesh *xo_mesh_match(void *data, void *data_end, const struct xo_config *cfg,
                                                     struct xo_flow *f)
{
    struct xo_cursor c = { .pos = data, .end = data_end };
    struct ethhdr *eth;
    if (xo_parse_eth(&c, &eth) != bpf_htons(ETH_P_IP))
        return NULL;
    struct iphdr *ip;
    if (xo_parse_ipv4(&c, &ip) < 0 || ip->daddr != cfg->node_ip || ip->ihl != 5)
        return NULL;
    if (!xo_flow_parse(data, ip, c, f))
        return NULL;
    struct xo_mesh_key mk = { .port = f->dport, .proto = f->proto };
    return xo_lb_mesh.lookup(&mk);
}

/* An outside client may not use an overlay address: its replies would be routed into
 * that network instead of back to it. */
static __always_inline int xo_is_overlay(__be32 addr)
{
    struct xo_subnet_key key = { .prefixlen = 32, .addr = addr };
    return xo_subnets.lookup(&key) != NULL;
}

/* --- XDP: the forward path to a remote backend ------------------------------------------ */

/* A TCP/UDP packet for this node's IP on a published port, in XDP (`len`: the whole
 * frame). Returns XDP_TX or a redirect (encapsulated to the backend's node), XDP_PASS
 * (local backend, not a mesh packet, or no neighbour entry for the backend's node yet:
 * tc does the rest), or -reason. */
static __always_inline int xo_mesh_xdp(struct xdp_md *ctx, const struct xo_config *cfg, __u32 len)
{
    xo_reparse_barrier();
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct xo_flow f = {};
    struct xo_mesh *m = xo_mesh_match(data, data_end, cfg, &f);
    if (!m)
        return XDP_PASS;
    if (xo_is_overlay(f.saddr))
        return -XO_DROP_MESH_OVERLAY_SOURCE;
    __u32 vni = m->vni;
    struct xo_lb_choice c = {};
    int ret = xo_lb_choose(m->service, m->flags, &f, m->port, &c);
    if (ret < 0)
        return ret;
    const struct xo_endpoint *be = c.where;
    if (!be)
        return -XO_DROP_UNKNOWN_DESTINATION;
    if (be->ifindex)
        return XDP_PASS;          /* here: only tc can hand it into the container */
    __be32 node_ip = be->node_ip;
    __u32 peer_slot = be->slot;
    __u8 inner_dst[ETH_ALEN];
    xo_mac_copy(inner_dst, be->mac);

    /* The underlay's next hop for the backend's node, and its MTU for the encapsulated
     * packet. Asked before anything is written: if it cannot be answered here, tc gets
     * the packet as it came and does it all (redirect_neigh resolves the neighbour). */
    struct bpf_fib_lookup fib = {};
    fib.family = 2;               /* AF_INET */
    fib.l4_protocol = IPPROTO_UDP;
    fib.tot_len = XO_ENCAP_LEN + (len - ETH_HLEN);
    fib.ipv4_src = cfg->node_ip;
    fib.ipv4_dst = node_ip;
    fib.ifindex = cfg->underlay_ifindex;
    long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), xo_fib_flags(cfg));
    if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
        return -XO_DROP_MESH_TOO_BIG;
    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_PASS;

    /* DNAT: destination address and port, IP and L4 checksums by hand. */
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > data_end)
        return -XO_DROP_MALFORMED_IP;
    struct xo_cursor l4 = { .pos = ip + 1, .end = data_end };    /* no options: xo_mesh_match */
    __u16 *l4_check;
    __be16 *dport;
    if (f.proto == IPPROTO_TCP) {
        struct tcphdr *th;
        if (xo_parse_tcp(&l4, &th) < 0)
            return -XO_DROP_MALFORMED_IP;
        l4_check = &th->check;
        dport = &th->dest;
    } else {
        struct udphdr *uh;
        if (xo_parse_udp(&l4, &uh) < 0)
            return -XO_DROP_MALFORMED_IP;
        l4_check = &uh->check;
        dport = &uh->dest;
    }
    /* A checksum left to offload (CHECKSUM_PARTIAL: a sender on this machine, across
     * veths) holds only the pseudo-header's sum, and the frame XDP sends on would not
     * say so: tc's checksum helpers know the difference. A finished checksum equal to
     * it (1 in 65,536) only takes the slower path. */
    if (*l4_check == xo_pseudo_header_csum(ip))
        return XDP_PASS;
    xo_lb_commit(&f, &c, len);

    /* UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff. */
    int udp_none = f.proto == IPPROTO_UDP && *l4_check == 0;
    if (!udp_none) {
        xo_csum_replace4(l4_check, ip->daddr, c.ip);
        xo_csum_replace2(l4_check, *dport, c.port);
        if (f.proto == IPPROTO_UDP && *l4_check == 0)
            *l4_check = 0xffff;
    }
    xo_csum_replace4((__u16 *)&ip->check, ip->daddr, c.ip);
    ip->daddr = c.ip;
    *dport = c.port;
    __u32 hash = xo_flow_hash(ip, data_end);

    /* Room for the outer headers in front, then Ethernet (from the FIB), IPv4, UDP, VXLAN
     * and the inner Ethernet header, field by field. */
    __u32 inner_len = len - ETH_HLEN;
    if (bpf_xdp_adjust_head(ctx, -(int)XO_ENCAP_LEN))
        return -XO_DROP_ENCAP_FAILED;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct xo_encap_headers *h = data + ETH_HLEN;
    if ((void *)(h + 1) > data_end)
        return -XO_DROP_ENCAP_FAILED;
    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
    eth->h_proto = bpf_htons(ETH_P_IP);
    __u8 gw[ETH_ALEN] = XO_GW_MAC;
    xo_encap_fill(h, cfg->node_ip, node_ip, cfg->vxlan_port, vni, hash, inner_len, XO_VXLAN_FLAG_MESH, gw,
                  inner_dst);

    xo_count_tx(xo_peer_traffic(peer_slot), len + XO_ENCAP_LEN);
    if (fib.ifindex == ctx->ingress_ifindex)
        return XDP_TX;
    return bpf_redirect(fib.ifindex, 0);
}

/* --- tc: the whole forward path (local backends; everything without XDP) ------------------ */

/* A packet on the underlay's tc ingress that is not VXLAN. Returns XO_MESH_NOT_MESH, or
 * for a routing-mesh packet the tc verdict (redirected to the backend) or -reason. */
static __always_inline int xo_mesh_tc(struct __sk_buff *skb, const struct xo_config *cfg)
{
    xo_reparse_barrier();
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct xo_flow f = {};
    struct xo_mesh *m = xo_mesh_match(data, data_end, cfg, &f);
    if (!m)
        return XO_MESH_NOT_MESH;
    __u32 len = skb->len;
    if (xo_is_overlay(f.saddr))
        return -XO_DROP_MESH_OVERLAY_SOURCE;
    __u32 vni = m->vni;
    struct xo_lb_choice c = {};
    int ret = xo_lb_choose(m->service, m->flags, &f, m->port, &c);
    if (ret < 0)
        return ret;
    const struct xo_endpoint *be = c.where;
    if (!be)
        return -XO_DROP_UNKNOWN_DESTINATION;
    __u32 ifindex = be->ifindex;
    __be32 node_ip = be->node_ip;
    __u32 slot = be->slot;        /* local: the backend's counters; remote: its node's */
    __u8 be_mac[ETH_ALEN];
    xo_mac_copy(be_mac, be->mac);
    if (!ifindex) {
        /* The same check XDP makes through the FIB: the device's MTU, 50 bytes more. */
        __u32 mtu = 0;
        if (bpf_check_mtu(skb, cfg->underlay_ifindex, &mtu, XO_ENCAP_LEN, 0))
            return -XO_DROP_MESH_TOO_BIG;
    }
    xo_lb_commit(&f, &c, len);
    ret = xo_lb_rewrite(skb, &f, XO_IP_DADDR_OFF, f.daddr, c.ip, f.l4_off + offsetof(struct tcphdr, dest),
                        f.dport, c.port);
    if (ret < 0)
        return ret;

    if (ifindex)
        return xo_deliver_local(skb, ifindex, be_mac, xo_endpoint_traffic(slot), len, -XO_DROP_MALFORMED_IP);
    __u8 gw[ETH_ALEN] = XO_GW_MAC;
    data = (void *)(long)skb->data;
    data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > data_end)
        return -XO_DROP_MALFORMED_IP;
    __u32 hash = xo_flow_hash(ip, data_end);
    ret = xo_vxlan_encap(skb, cfg, node_ip, vni, hash, XO_VXLAN_FLAG_MESH, gw, be_mac);
    if (ret < 0)
        return ret;
    return xo_send_underlay(skb, cfg, node_ip, xo_peer_traffic(slot));
}

/* --- replies ------------------------------------------------------------------------------- */

/* A mesh reply, its source already the node IP:published port the client talked to, on
 * its way to `client`: out of the underlay; or, when the client is this node itself, into
 * its stack on lo. lo takes only frames for its own address, 00:00:00:00:00:00 (others
 * would be PACKET_OTHERHOST, which IP drops), and lo is the one device where a packet
 * from this node's own address is not a martian. Returns the verdict or -reason. */
static __always_inline int xo_mesh_reply_out(struct __sk_buff *skb, const struct xo_config *cfg, __be32 client)
{
    if (client != cfg->node_ip)
        return xo_redirect_underlay(skb, cfg, client);
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return -XO_DROP_MALFORMED_IP;
    __builtin_memset(eth->h_dest, 0, ETH_ALEN);
    skb->mark = XO_MARK_MESH_REPLY;
    return bpf_redirect(XO_LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

/* A backend's packet to an address outside every overlay network (endpoint.c): a reply
 * of a routing-mesh connection? Came in here: source := this node's IP:published port,
 * out of the underlay. Came in through another node: VXLAN back to it. Returns
 * XO_MESH_NOT_MESH, or for a mesh reply the tc verdict or -reason. */
static __always_inline int xo_mesh_reply(struct __sk_buff *skb, const struct xo_config *cfg, __u32 vni,
                                         const struct xo_flow *f, const __u8 *src_mac)
{
    int ret = xo_lb_reverse_nat(skb, f);
    if (ret < 0)
        return ret;
    if (ret)
        return xo_mesh_reply_out(skb, cfg, f->daddr);
    struct xo_ct_key k = xo_ct_key_make(f->saddr, f->daddr, f->sport, f->dport, f->proto, XO_CT_MESH);
    struct xo_ct *ct = xo_lb_ct.lookup(&k);
    if (!ct)
        return XO_MESH_NOT_MESH;
    __be32 ingress = ct->vip;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > data_end)
        return -XO_DROP_MALFORMED_IP;
    __u32 hash = xo_flow_hash(ip, data_end);
    __u8 mac[ETH_ALEN], gw[ETH_ALEN] = XO_GW_MAC;
    xo_mac_copy(mac, src_mac);
    ret = xo_vxlan_encap(skb, cfg, ingress, vni, hash, XO_VXLAN_FLAG_MESH, mac, gw);
    if (ret < 0)
        return ret;
    struct xo_peer *peer = xo_peers.lookup(&ingress);
    return xo_send_underlay(skb, cfg, ingress, peer ? xo_peer_traffic(peer->slot) : NULL);
}

/* On the backend's node, decap of a mesh packet from the node the client talked to
 * (peer): remember where the backend's replies go. Written only when it changes or a new
 * TCP connection starts; then a reply entry this node may hold for the same tuple, from
 * an older connection that came in here (the client reusing its port towards another
 * node), goes: it would send the replies from this node's address. */
static __always_inline void xo_mesh_remember(const struct xo_flow *f, __be32 peer)
{
    struct xo_ct_key k = xo_ct_key_make(f->daddr, f->saddr, f->dport, f->sport, f->proto, XO_CT_MESH);
    int syn = xo_lb_is_syn(f);
    struct xo_ct *ct = xo_lb_ct.lookup(&k);
    if (ct && ct->vip == peer && !syn)
        return;
    struct xo_ct v = { .vip = peer };
    xo_lb_ct.update(&k, &v);
    k.dir = XO_CT_REPLY;
    xo_lb_ct.delete(&k);
}

#endif
