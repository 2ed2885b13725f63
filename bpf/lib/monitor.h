/* Drops, and what `xoverlay monitor` sees of the data path.
 *
 * Every drop goes through xo_drop(ctx, hook, reason, bytes), called once per program, at
 * the end of its entry function (the return convention is in lib/drop.h): it counts the
 * drop in xo_drops and, only while a monitor listens, writes an event with the packet's
 * addresses, as the packet was when it was given up, to the xo_events ring buffer.
 * Forwarded packets call xo_tell_forward(), which writes one event in `sample` only when
 * the monitor asked for them. With no monitor running, the whole cost is one lookup in a
 * one-entry array (inlined by the verifier) and one test of xo_monitor.events: the
 * parsing below runs only for packets that are told. */
#ifndef XO_MONITOR_H
#define XO_MONITOR_H

#include "common.h"
#include "maps.h"
#include "counters.h"
#include "parsing.h"
#include "vxlan.h"

static __always_inline struct xo_monitor *xo_monitor_get(void)
{
    __u32 zero = 0;
    return xo_monitor.lookup(&zero);
}

/* The (inner) IPv4 packet at c: addresses, protocol, ports. */
static __always_inline void xo_event_ip(struct xo_event *ev, struct xo_cursor *c)
{
    struct iphdr *ip;
    if (xo_parse_ipv4(c, &ip) < 0)
        return;
    ev->flags |= XO_EVF_IP;
    ev->saddr = ip->saddr;
    ev->daddr = ip->daddr;
    ev->protocol = ip->protocol;
    if (ip->frag_off & bpf_htons(XO_IP_OFFSET))
        return;                              /* a later fragment: no L4 header */
    struct xo_ports *ports;                  /* TCP, UDP: the ports; ICMP: type and code */
    if (xo_peek_ports(c, &ports) < 0)
        return;
    if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
        ev->sport = ports->source;
        ev->dport = ports->dest;
        ev->flags |= XO_EVF_PORTS;
    } else if (ip->protocol == IPPROTO_ICMP) {
        __u8 *icmp = (__u8 *)ports;
        ev->sport = bpf_htons(icmp[0]);      /* type */
        ev->dport = bpf_htons(icmp[1]);      /* code */
        ev->flags |= XO_EVF_PORTS;
    }
}

/* Read what can be read of the frame at [data, data_end). Not `tunnel`: a container's
 * frame. `tunnel` (the underlay, or a frame just encapsulated): VXLAN to our port (outer
 * header, VNI, then the inner frame), or anything else to or from this node (its IPv4
 * header as the outer one). */
static __always_inline void xo_event_parse(struct xo_event *ev, void *data, void *data_end,
                                           int tunnel, __be16 vxlan_port, __be32 node_ip)
{
    struct xo_cursor c = { .pos = data, .end = data_end };
    struct ethhdr *eth;
    if (xo_parse_eth(&c, &eth) < 0)
        return;
    ev->ethertype = eth->h_proto;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return;
    if (tunnel) {
        /* An underlay frame is to or from this node; one that is neither was already
         * decapsulated (a drop after decap): read it as the container's packet. */
        struct iphdr *peek = c.pos;
        if ((void *)(peek + 1) <= data_end && peek->daddr != node_ip && peek->saddr != node_ip)
            tunnel = 0;
    }
    if (!tunnel) {
        xo_event_ip(ev, &c);
        return;
    }
    struct iphdr *ip;
    if (xo_parse_ipv4(&c, &ip) < 0)
        return;
    ev->flags |= XO_EVF_OUTER;
    ev->outer_saddr = ip->saddr;
    ev->outer_daddr = ip->daddr;
    ev->protocol = ip->protocol;
    if (ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(XO_IP_OFFSET)))
        return;
    struct udphdr *udp;
    if (xo_parse_udp(&c, &udp) != vxlan_port)
        return;
    struct xo_vxlanhdr *vx;
    int vni = xo_parse_vxlan(&c, &vx);
    if (vni < 0)
        return;
    ev->vni = vni;
    ev->flags |= XO_EVF_VNI;
    struct ethhdr *inner;
    if (xo_parse_eth(&c, &inner) < 0)
        return;
    ev->ethertype = inner->h_proto;
    ev->protocol = 0;
    if (inner->h_proto == bpf_htons(ETH_P_IP))
        xo_event_ip(ev, &c);
}

/* Complete and write one event (the caller filled in type, hook, reason, ifindex and len).
 * Callers reach it only after the monitor check. `tunnel`: the frame is (or may be)
 * VXLAN, read its outer header first. Inlined (BCC 0.26 cannot link BPF-to-BPF calls:
 * "jump out of range") where a program drops and where it tells of a forwarded packet;
 * it adds no instruction to a packet's path while no monitor runs. */
static __always_inline void xo_tell(struct xo_monitor *mon, struct xo_event *ev, void *data,
                                    void *data_end, int tunnel)
{
    ev->ts_ns = bpf_ktime_get_ns();
    __be16 port = 0;
    __be32 node_ip = 0;
    struct xo_config *cfg = xo_get_config();
    if (cfg) {
        port = cfg->vxlan_port;
        node_ip = cfg->node_ip;
    }
    if (ev->hook == XO_HOOK_ENDPOINT) {
        /* The network is the sender's: its veth says which endpoint it is. */
        __u32 ifindex = ev->ifindex;
        struct xo_local_endpoint *self = xo_local_endpoints.lookup(&ifindex);
        if (self) {
            ev->vni = self->vni;
            ev->flags |= XO_EVF_VNI;
        }
    }
    xo_event_parse(ev, data, data_end, tunnel, port, node_ip);
    if (xo_events.ringbuf_output(ev, sizeof(*ev), 0))
        __sync_fetch_and_add(&mon->lost, 1);
}

static __always_inline int xo_drop_skb(struct __sk_buff *skb, int hook, int reason, __u32 bytes)
{
    /* LLVM 14 may keep &skb->ingress_ifindex from an earlier read in a register and load
     * through it here, which the verifier refuses (a moved context pointer): the empty
     * asm makes skb a new value, so the field is read from skb itself. */
    asm volatile("" : "+r"(skb));
    xo_count_drop(reason, bytes);
    struct xo_monitor *mon = xo_monitor_get();
    if (mon && (mon->events & XO_MON_DROPS)) {
        struct xo_event ev = { .type = XO_EVENT_DROP, .hook = hook, .reason = reason,
                               .ifindex = skb->ingress_ifindex, .len = bytes };
        xo_tell(mon, &ev, (void *)(long)skb->data, (void *)(long)skb->data_end,
                hook != XO_HOOK_ENDPOINT);
    }
    return TC_ACT_SHOT;
}

static __always_inline int xo_drop_xdp(struct xdp_md *ctx, int hook, int reason, __u32 bytes)
{
    xo_count_drop(reason, bytes);
    struct xo_monitor *mon = xo_monitor_get();
    if (mon && (mon->events & XO_MON_DROPS)) {
        struct xo_event ev = { .type = XO_EVENT_DROP, .hook = hook, .reason = reason,
                               .ifindex = ctx->ingress_ifindex, .len = bytes };
        xo_tell(mon, &ev, (void *)(long)ctx->data, (void *)(long)ctx->data_end, 1);
    }
    return XDP_DROP;
}

/* Count a drop and return the verdict that drops (TC_ACT_SHOT, XDP_DROP); tell the
 * monitor if one listens.
 *   ctx:    the program's context (struct __sk_buff * or struct xdp_md *)
 *   hook:   the program's XO_HOOK_* (events.h)
 *   reason: an enum xo_drop_reason (drop.h), as a positive number
 *   bytes:  the whole frame's length, as it arrived */
#define xo_drop(ctx, hook, reason, bytes)                                          \
    _Generic((ctx), struct __sk_buff *: xo_drop_skb, struct xdp_md *: xo_drop_xdp)( \
        ctx, hook, reason, bytes)

/* A packet is being forwarded (action: XO_FWD_*): tell the monitor, one in `sample`, if
 * it asked for forwarded packets. Call it where the packet's headers are as the event
 * should show them (before decap, after encap). */
static __always_inline void xo_tell_forward(struct __sk_buff *skb, int hook, int action, __u32 bytes)
{
    struct xo_monitor *mon = xo_monitor_get();
    if (!mon || !(mon->events & XO_MON_FORWARDS))
        return;
    __u32 sample = mon->sample;
    if (sample > 1 && bpf_get_prandom_u32() % sample)
        return;
    struct xo_event ev = { .type = XO_EVENT_FORWARD, .hook = hook, .reason = action,
                           .ifindex = skb->ingress_ifindex, .len = bytes };
    xo_tell(mon, &ev, (void *)(long)skb->data, (void *)(long)skb->data_end, action != XO_FWD_LOCAL);
}

/* A new connection to a service: the client's packet as it sent it (client -> VIP), the
 * backend chosen in xlate, the service id as reason. Call before the DNAT. */
static __always_inline void xo_tell_service_conn(struct __sk_buff *skb, __u32 service, __be32 backend,
                                                 __be16 backend_port)
{
    struct xo_monitor *mon = xo_monitor_get();
    if (!mon || !(mon->events & XO_MON_SERVICES))
        return;
    struct xo_event ev = { .type = XO_EVENT_SERVICE_CONN, .hook = XO_HOOK_ENDPOINT, .reason = service,
                           .ifindex = skb->ingress_ifindex, .len = skb->len, .flags = XO_EVF_XLATE,
                           .xlate_daddr = backend, .xlate_dport = backend_port };
    xo_tell(mon, &ev, (void *)(long)skb->data, (void *)(long)skb->data_end, 0);
}

#endif
