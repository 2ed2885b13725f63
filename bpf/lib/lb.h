/* Services: east-west load balancing. A packet a container sends to VIP:port/proto of its
 * network is DNATed to a backend chosen by Maglev (or kept on the backend the connection
 * table remembers), and replies get the VIP back where they are handed to the client:
 * local delivery (endpoint.c) or decap (underlay_tc.c). Both directions' entries live on
 * the client's node, so no other node needs to know about the connection.
 *
 * Checksums are updated incrementally. A container's TCP/UDP packet is usually
 * CHECKSUM_PARTIAL (its checksum field holds only the pseudo-header sum, the rest is left
 * to offload): BPF_F_PSEUDO_HDR on the address change updates exactly that, and a port
 * change then needs nothing, which bpf_l4_csum_replace knows (a tc program cannot read
 * ip_summed, so the L4 checksum is the helper's). The IPv4 header's checksum is always
 * complete: that one, and the bytes, are written in place. */
#ifndef XO_LB_H
#define XO_LB_H

#include "common.h"
#include "csum.h"
#include "maps.h"
#include "counters.h"
#include "parsing.h"
#include "vxlan.h"
#include "monitor.h"

/* Offsets in the frame (Ethernet, then IPv4, in both places we rewrite). */
#define XO_IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define XO_IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

/* Another pick when Maglev hands a client itself: 4 tries miss with 1/N^4. */
#define XO_LB_SELF_RETRIES 3

/* What xo_lb_client did with a packet that it did not drop. */
#define XO_LB_NOT_SERVICE 0
#define XO_LB_DNAT 1

/* A connection table key (dir: XO_CT_*), its padding zero: keys compare as bytes. */
static __always_inline struct xo_ct_key xo_ct_key_make(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport,
                                                       __u8 proto, __u8 dir)
{
    struct xo_ct_key k = { .saddr = saddr, .daddr = daddr, .sport = sport, .dport = dport, .proto = proto,
                           .dir = dir };
    return k;
}

/* A TCP SYN without ACK: the client opens a new connection. */
static __always_inline int xo_lb_is_syn(const struct xo_flow *f)
{
    return f->proto == IPPROTO_TCP && (f->tcp_flags & (XO_TCP_SYN | XO_TCP_ACK)) == XO_TCP_SYN;
}

/* The flow's hash for Maglev: the 5-tuple, or the client address alone with affinity.
 * (xoverlay/core/maglev.py has the same function, for tests that predict the choice.) */
static __always_inline __u32 xo_lb_hash(const struct xo_flow *f, __u32 flags)
{
    __u32 h = xo_mix32(f->saddr ^ 0x9e3779b9);
    if (flags & XO_LB_AFFINITY)
        return h;
    h = xo_mix32(h ^ f->daddr);
    h = xo_mix32(h ^ (((__u32)f->sport << 16) | f->dport));
    return xo_mix32(h ^ f->proto);
}

/* Maglev: the backend index at slot hash % M of the service's table (0: no table). */
static __always_inline __u32 xo_lb_pick(__u32 service, __u32 hash)
{
    void *table = xo_lb_maglev.lookup(&service);
    if (!table)
        return 0;
    __u32 zero = 0;
    __u32 *m = bpf_map_lookup_elem(table, &zero);
    if (!m || !*m)
        return 0;
    __u32 slot = hash % *m + 1;
    __u32 *index = bpf_map_lookup_elem(table, &slot);
    return index ? *index : 0;
}

/* Rewrite one address and one port of the packet, checksums included. addr_off is
 * XO_IP_SADDR_OFF or XO_IP_DADDR_OFF. Returns 0 or -XO_DROP_LB_NAT_FAILED. */
static __always_inline int xo_lb_rewrite(struct __sk_buff *skb, const struct xo_flow *f,
                                         __u32 addr_off, __be32 old_addr, __be32 new_addr,
                                         __u32 port_off, __be16 old_port, __be16 new_port)
{
    __u32 csum_off = f->l4_off + (f->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
                                                           : offsetof(struct udphdr, check));
    /* UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff. */
    __u64 udp = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    if (old_addr != new_addr &&
        bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | udp | sizeof(new_addr)))
        return -XO_DROP_LB_NAT_FAILED;
    if (old_port != new_port && bpf_l4_csum_replace(skb, csum_off, old_port, new_port, udp | sizeof(new_port)))
        return -XO_DROP_LB_NAT_FAILED;
    /* The helpers moved the packet's pointers: the headers again. */
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > data_end)
        return -XO_DROP_LB_NAT_FAILED;
    if (old_addr != new_addr) {
        xo_csum_replace4((__u16 *)&ip->check, old_addr, new_addr);
        if (addr_off == XO_IP_SADDR_OFF)
            ip->saddr = new_addr;
        else
            ip->daddr = new_addr;
    }
    if (old_port != new_port) {
        if (port_off > ETH_HLEN + XO_IPV4_MAX_HLEN + offsetof(struct tcphdr, dest))
            return -XO_DROP_LB_NAT_FAILED;
        /* The mask is a no-op after the check, but one the verifier sees on the
         * register that is used (clang tests a copy, from the stack, whose bound the
         * verifier does not know); the empty asm keeps clang from dropping it. */
        asm volatile("" : "+r"(port_off));
        __be16 *port = data + (port_off & 0x7f);
        if ((void *)(port + 1) > data_end)
            return -XO_DROP_LB_NAT_FAILED;
        *port = new_port;
    }
    return 0;
}

/* The backend a connection goes to. */
struct xo_lb_choice {
    struct xo_lb_backend_key bk;
    __be32 ip;
    __be16 port;              /* target port: the backend's own, or the default given */
    int fresh;                /* a new connection (Maglev chose) rather than a known one */
    __u32 slot;               /* the backend's counters */
    const struct xo_endpoint *where;  /* where it is (in its entry): NULL if nowhere yet */
};

/* Which backend of service `sid` the flow goes to: the one the connection table
 * remembers, or Maglev's choice for a new connection. Writes nothing (but forgets a
 * connection whose backend is gone), so a caller may still decide not to handle the
 * packet. Returns 0 or -reason. Shared by the client's tc program (east-west) and
 * the routing mesh (XDP and tc on the underlay). */
static __always_inline int xo_lb_choose(__u32 sid, __u32 flags, const struct xo_flow *f, __be16 default_port,
                                        struct xo_lb_choice *c)
{
    int syn = xo_lb_is_syn(f);
    struct xo_ct_key ck = xo_ct_key_make(f->saddr, f->daddr, f->sport, f->dport, f->proto, XO_CT_SERVICE);
    struct xo_lb_backend *be;
    c->bk.service = sid;
    c->fresh = 0;
    /* A SYN opens a new connection whatever the table remembers of this 5-tuple: new
     * connections never go to a draining backend. */
    struct xo_ct *ct = syn ? NULL : xo_lb_ct.lookup(&ck);
    if (ct && ct->service == sid) {
        c->bk.index = ct->backend;
        be = xo_lb_backends.lookup(&c->bk);
        if (!be) {
            /* Its backend was removed: this connection is over. Forget it, so the next
             * packet of the 5-tuple (UDP) starts a new one. */
            xo_lb_ct.delete(&ck);
            return -XO_DROP_LB_BACKEND_GONE;
        }
    } else {
        __u32 hash = xo_lb_hash(f, flags);
        c->bk.index = xo_lb_pick(sid, hash);
        be = c->bk.index ? xo_lb_backends.lookup(&c->bk) : NULL;
        /* A client that is itself a backend cannot be its own (the packet would come
         * back to it from its own address, which the stack drops as martian): look
         * further along, a few times, for another backend. */
#pragma unroll
        for (int i = 1; i <= XO_LB_SELF_RETRIES; i++) {
            if (!be || be->ip != f->saddr)
                break;
            c->bk.index = xo_lb_pick(sid, xo_mix32(hash + i));
            be = c->bk.index ? xo_lb_backends.lookup(&c->bk) : NULL;
        }
        if (!be || be->ip == f->saddr)
            return -XO_DROP_LB_NO_BACKEND;
        c->fresh = 1;
    }
    c->ip = be->ip;
    c->port = be->port ? be->port : default_port;
    c->slot = be->slot;
    c->where = be->where.node_ip ? &be->where : NULL;
    return 0;
}

/* The packet goes to c's backend: remember a new connection (both entries: which
 * backend, and what a reply must get back, the address the client talked to, f->daddr
 * and f->dport) and count it. */
static __always_inline void xo_lb_commit(const struct xo_flow *f, const struct xo_lb_choice *c, __u32 len)
{
    __u32 sid = c->bk.service;
    if (c->fresh) {
        struct xo_ct_key ck = xo_ct_key_make(f->saddr, f->daddr, f->sport, f->dport, f->proto, XO_CT_SERVICE);
        struct xo_ct fwd = { .service = sid, .backend = c->bk.index };
        xo_lb_ct.update(&ck, &fwd);
        struct xo_ct_key rk = xo_ct_key_make(c->ip, f->saddr, c->port, f->sport, f->proto, XO_CT_REPLY);
        struct xo_ct rev = { .service = sid, .backend = c->bk.index, .vip = f->daddr, .vport = f->dport };
        xo_lb_ct.update(&rk, &rev);
    }
    __u32 slot = c->slot;
    xo_lb_count(xo_lb_service_stats.lookup(&sid), len, c->fresh);
    xo_lb_count(xo_lb_backend_stats.lookup(&slot), len, c->fresh);
}

/* A packet of a network with services that is for no service. A new direct connection:
 * a reply entry left from an old service connection with the same 5-tuple must not
 * rewrite its replies. */
static __always_inline void xo_lb_direct(const struct xo_flow *f)
{
    if (!xo_lb_is_syn(f))
        return;
    struct xo_ct_key stale = xo_ct_key_make(f->daddr, f->saddr, f->dport, f->sport, f->proto, XO_CT_REPLY);
    xo_lb_ct.delete(&stale);
}

/* A packet from a container (vni): if it is for a service, DNAT it to a backend, update
 * *f and set *where to where the backend is (NULL: nowhere yet). Returns
 * XO_LB_NOT_SERVICE, XO_LB_DNAT or -reason. */
static __always_inline int xo_lb_client(struct __sk_buff *skb, __u32 vni, struct xo_flow *f,
                                        const struct xo_endpoint **where)
{
    struct xo_lb_service_key sk = { .vni = vni, .vip = f->daddr, .port = f->dport, .proto = f->proto };
    struct xo_lb_service *svc = xo_lb_services.lookup(&sk);
    if (!svc) {
        xo_lb_direct(f);
        return XO_LB_NOT_SERVICE;
    }
    struct xo_lb_choice c = {};
    int ret = xo_lb_choose(svc->id, svc->flags, f, f->dport, &c);
    if (ret < 0)
        return ret;
    if (c.fresh)
        xo_tell_service_conn(skb, c.bk.service, c.ip, c.port);
    xo_lb_commit(f, &c, skb->len);
    ret = xo_lb_rewrite(skb, f, XO_IP_DADDR_OFF, f->daddr, c.ip, f->l4_off + offsetof(struct tcphdr, dest),
                        f->dport, c.port);
    if (ret < 0)
        return ret;
    f->daddr = c.ip;
    f->dport = c.port;
    *where = c.where;
    return XO_LB_DNAT;
}

/* Reverse NAT: a reply of a connection the table has an XO_CT_REPLY entry for (to a
 * service, or through the routing mesh) gets the source the client talked to, VIP:port
 * or node IP:published port. Returns 1 if it was rewritten, 0 if the table has no such
 * entry (not a reply it knows of), or -reason. */
static __always_inline int xo_lb_reverse_nat(struct __sk_buff *skb, const struct xo_flow *f)
{
    struct xo_ct_key rk = xo_ct_key_make(f->saddr, f->daddr, f->sport, f->dport, f->proto, XO_CT_REPLY);
    struct xo_ct *ct = xo_lb_ct.lookup(&rk);
    if (!ct)
        return 0;
    __be32 vip = ct->vip;
    __be16 vport = ct->vport;
    int ret = xo_lb_rewrite(skb, f, XO_IP_SADDR_OFF, f->saddr, vip, f->l4_off + offsetof(struct tcphdr, source),
                            f->sport, vport);
    return ret < 0 ? ret : 1;
}

/* --- telling a client its connection is gone ------------------------------------------- */

struct xo_reset_frame {
    struct ethhdr eth;
    struct iphdr ip;
    struct tcphdr tcp;
} __attribute__((packed));

static __always_inline __u16 xo_tcp_csum(const struct iphdr *ip, const struct tcphdr *th)
{
    /* Ones' complement sums do not care about byte order (RFC 1071): words are added as
     * they lie in memory, the pseudo-header's too. */
    __u32 sum = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) + (ip->daddr >> 16) +
                bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(*th));
    const __u16 *p = (const __u16 *)th;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(*th) / 2); i++)
        sum += p[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* Turn the client's TCP packet into a reset from the VIP (RFC 793's reply to a segment
 * for no connection) and send it back into the client, so that a connection whose
 * backend was removed ends at once instead of retransmitting into a black hole.
 * Returns the verdict. */
static __always_inline int xo_lb_reset(struct __sk_buff *skb, const struct xo_flow *f,
                                       const __u8 *client_mac, __u32 client_ifindex)
{
    struct xo_reset_frame r = {};
    __u8 gw[ETH_ALEN] = XO_GW_MAC;
    xo_mac_copy(r.eth.h_dest, client_mac);
    xo_mac_copy(r.eth.h_source, gw);
    r.eth.h_proto = bpf_htons(ETH_P_IP);
    r.ip.version = 4;
    r.ip.ihl = 5;
    r.ip.ttl = 64;
    r.ip.protocol = IPPROTO_TCP;
    r.ip.frag_off = bpf_htons(XO_IP_DF);
    r.ip.tot_len = bpf_htons(sizeof(r.ip) + sizeof(r.tcp));
    r.ip.saddr = f->daddr;
    r.ip.daddr = f->saddr;
    r.ip.check = xo_ipv4_csum(&r.ip);
    r.tcp.source = f->dport;
    r.tcp.dest = f->sport;
    __u8 *raw = (__u8 *)&r.tcp;
    raw[12] = 5 << 4;                               /* data offset: 20 bytes */
    if (f->tcp_flags & XO_TCP_ACK) {
        r.tcp.seq = f->ack_seq;
        raw[13] = XO_TCP_RST;
    } else {
        __u32 len = f->seg_len + !!(f->tcp_flags & XO_TCP_SYN) + !!(f->tcp_flags & XO_TCP_FIN);
        r.tcp.ack_seq = bpf_htonl(bpf_ntohl(f->seq) + len);
        raw[13] = XO_TCP_RST | XO_TCP_ACK;
    }
    r.tcp.check = xo_tcp_csum(&r.ip, &r.tcp);
    if (bpf_skb_change_tail(skb, sizeof(r), 0))
        return TC_ACT_SHOT;
    if (bpf_skb_store_bytes(skb, 0, &r, sizeof(r), 0))
        return TC_ACT_SHOT;
    return bpf_redirect_peer(client_ifindex, 0);
}

#endif
