/* tc ingress on each endpoint's host-side veth: every packet a container sends.
 *
 *   ARP request, for any
 *   address but its own       -> answered with the gateway's MAC, back into it (lib/arp.h)
 *   to a service (VIP:port)   -> DNAT to a backend (lib/lb.h), then as below
 *   same network, this node   -> straight into the other container (redirect_peer),
 *                                with the VIP put back if it is a service's reply
 *   same network, other node  -> VXLAN to that node (encap here, kernel picks the MAC)
 *   DNS to the gateway address -> the node's stack, through xo-gw (its DNS responder, docs/DNS.md)
 *   outside every network     -> the node's stack, through xo-gw, which masquerades it
 *                                (egress, docs/DESIGN.md); not from an --internal network
 *   a routing-mesh reply      -> to the outside client, from the node IP:port it talked
 *                                to, or back in VXLAN to that node (lib/mesh.h)
 *   anything else             -> dropped, counted by reason
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/monitor.h"
#include "lib/parsing.h"
#include "lib/vxlan.h"
#include "lib/lb.h"
#include "lib/mesh.h"
#include "lib/route.h"
#include "lib/deliver.h"
#include "lib/arp.h"

/* Why a packet to no endpoint of its network is dropped. Returns -reason. */
static __always_inline int xo_unroutable(__u32 vni, __be32 daddr)
{
    struct xo_subnet_key key = { .prefixlen = 32, .addr = daddr };
    struct xo_subnet *subnet = xo_subnets.lookup(&key);
    if (!subnet)
        return -XO_DROP_NO_ROUTE;
    if (subnet->vni != vni)
        return -XO_DROP_OTHER_NETWORK;
    return -XO_DROP_UNKNOWN_DESTINATION;
}

/* A DNS query (UDP or TCP port 53, not a fragment) to the gateway address. It cannot
 * just go up the stack from here (TC_ACT_OK): this veth is a port of the down headroom
 * bridge, which drops it. It enters the node's stack on xo-gw instead, the device that
 * holds 169.254.1.1 (and our MAC, so it is the host's frame). The reply comes back by a
 * route and a permanent neighbour entry per endpoint on its veth
 * (xoverlay/kernel/gateway.py), since the container's ARP reply would be dropped here. */
static __always_inline int xo_is_gateway_dns(struct xo_cursor *c, const struct iphdr *ip)
{
    if (ip->daddr != bpf_htonl(XO_GW_IP) || xo_ipv4_is_fragment(ip))
        return 0;
    if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
        return 0;
    struct xo_ports *ports;
    return xo_peek_ports(c, &ports) == bpf_htons(XO_DNS_PORT);
}

/* Not a unicast address a packet can leave for: 0/8, loopback, link-local (the gateway's
 * 169.254.1.1 answers DNS only), multicast, reserved and broadcast. */
static __always_inline int xo_is_outside_unicast(__be32 daddr)
{
    __u32 a = bpf_ntohl(daddr);
    __u8 first = a >> 24;
    return first != 0 && first != 127 && first < 224 && (a >> 16) != 0xa9fe;
}

/* Outside every overlay network: into the node's stack through xo-gw (as DNS is), which
 * routes it like the node's own traffic and masquerades it out of whichever device its
 * route takes (the agent's nftables table); conntrack turns the replies back to this
 * endpoint's address, and a route of the agent's sends them out of this veth. Chosen over
 * SNAT in BPF by measurement (docs/DESIGN.md, "Egress"). Returns the verdict or -reason. */
static __always_inline int xo_to_outside(struct __sk_buff *skb, __u16 self_flags, __u32 self_slot, __be32 daddr,
                                         __u32 len)
{
    if (!xo_is_outside_unicast(daddr))
        return -XO_DROP_NO_ROUTE;
    if (self_flags & XO_EP_NETWORK_INTERNAL)
        return -XO_DROP_EGRESS_INTERNAL;
    struct xo_config *cfg = xo_get_config();
    if (!cfg || !(cfg->flags & XO_CFG_EGRESS) || !cfg->gateway_ifindex)
        return -XO_DROP_NO_ROUTE;
    xo_count_tx(xo_endpoint_traffic(self_slot), len);
    xo_tell_forward(skb, XO_HOOK_ENDPOINT, XO_FWD_EGRESS, len);
    return bpf_redirect(cfg->gateway_ifindex, BPF_F_INGRESS);
}

/* A drop the client is told of: a TCP connection to a service whose backend is gone
 * ends with a reset (lib/lb.h) instead of retransmitting into a black hole. The handler
 * decides; the program's exit sends it once the drop is counted. */
struct xo_reset_to {
    __u8 mac[ETH_ALEN];       /* the client's */
    __u8 send;
};

/* Same network, this node: into the other container. `reverse_nat`: the sender backs a
 * service, so this may be a reply to a client here, which must see the VIP it talked to. */
static __always_inline int xo_to_local_endpoint(struct __sk_buff *skb, const struct xo_endpoint *dst,
                                                const struct xo_flow *f, int reverse_nat, __u32 len)
{
    __u32 slot = dst->slot;
    __u32 ifindex = dst->ifindex;
    __u8 mac[ETH_ALEN];
    xo_mac_copy(mac, dst->mac);
    if (reverse_nat) {
        int ret = xo_lb_reverse_nat(skb, f);
        if (ret < 0)
            return ret;
    }
    xo_tell_forward(skb, XO_HOOK_ENDPOINT, XO_FWD_LOCAL, len);
    return xo_deliver_local(skb, ifindex, mac, xo_endpoint_traffic(slot), len, -XO_DROP_MALFORMED_IP);
}

/* Same network, another node: VXLAN to that node, counted as sent to it. */
static __always_inline int xo_to_remote_endpoint(struct __sk_buff *skb, const struct xo_endpoint *dst, __u32 vni,
                                                 const __u8 *src_mac)
{
    __u32 slot = dst->slot;   /* its node's counters */
    struct xo_config *cfg = xo_get_config();
    if (!cfg)
        return -XO_DROP_ENCAP_FAILED;
    __be32 node_ip = dst->node_ip;
    /* The headers again (a DNAT rewrote the packet): the flow hash is the packet's as sent. */
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct xo_cursor c = { .pos = data, .end = data_end };
    struct ethhdr *eth;
    struct iphdr *ip;
    if (xo_parse_eth(&c, &eth) < 0 || xo_parse_ipv4(&c, &ip) < 0)
        return -XO_DROP_MALFORMED_IP;
    __u32 hash = xo_flow_hash(ip, data_end);
    __u8 inner_src[ETH_ALEN], inner_dst[ETH_ALEN];
    xo_mac_copy(inner_src, src_mac);
    xo_mac_copy(inner_dst, dst->mac);
    int ret = xo_vxlan_encap(skb, cfg, node_ip, vni, hash, 0, inner_src, inner_dst);
    if (ret < 0)
        return ret;
    ret = xo_send_underlay(skb, cfg, node_ip, xo_peer_traffic(slot));
    if (ret == TC_ACT_REDIRECT)
        xo_tell_forward(skb, XO_HOOK_ENDPOINT, XO_FWD_ENCAP, skb->len);
    return ret;
}

/* The container's packet (`len` bytes), its flow in *f. Returns the tc verdict or
 * -reason; *reset says whether a drop is answered. */
static __always_inline int xo_from_container(struct __sk_buff *skb, __u32 len, struct xo_flow *f,
                                             struct xo_reset_to *reset)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    /* Who sent it: the endpoint behind this veth, with its own addresses only. */
    __u32 ifindex = skb->ingress_ifindex;
    struct xo_local_endpoint *self = xo_local_endpoints.lookup(&ifindex);
    if (!self)
        return -XO_DROP_UNKNOWN_INTERFACE;
    struct xo_cursor c = { .pos = data, .end = data_end };
    struct ethhdr *eth;
    int proto = xo_parse_eth(&c, &eth);
    if (proto == bpf_htons(ETH_P_ARP))
        return xo_arp_answer(skb, &c, eth, self, ifindex, len);
    if (proto != bpf_htons(ETH_P_IP))
        return -XO_DROP_NOT_IPV4;
    struct iphdr *ip;
    int ret = xo_parse_ipv4(&c, &ip);
    if (ret < 0)
        return ret;
    if (ip->saddr != self->ip || !xo_mac_equal(eth->h_source, self->mac))
        return -XO_DROP_SPOOFED_SOURCE;
    __u32 vni = self->vni;
    __be32 daddr = ip->daddr;

    /* DNS for the node's responder, before anything else: 169.254.1.1 is never a VIP.
     * With no gateway device (yet), it is dropped below like anything to 169.254.1.1. */
    if (xo_is_gateway_dns(&c, ip)) {
        struct xo_config *cfg = xo_get_config();
        if (cfg && cfg->gateway_ifindex) {
            xo_count_tx(xo_endpoint_traffic(self->slot), len);
            return bpf_redirect(cfg->gateway_ifindex, BPF_F_INGRESS);
        }
    }

    /* Services only for an address that is no endpoint: a VIP never is. The packet may be
     * rewritten (and every packet pointer with it): from here on, only the values saved
     * above and in f. */
    __u16 self_flags = self->flags;
    __u32 self_slot = self->slot;
    int has_flow = xo_flow_parse(data, ip, c, f);
    struct xo_endpoint_key dst_key = { .vni = vni, .ip = daddr };
    const struct xo_endpoint *dst = xo_endpoints.lookup(&dst_key);
    int lb = XO_LB_NOT_SERVICE;
    int services = has_flow && (self_flags & XO_EP_NETWORK_HAS_SERVICES);
    if (services && dst) {
        xo_lb_direct(f);
    } else if (services) {
        lb = xo_lb_client(skb, vni, f, &dst);
        if (lb == -XO_DROP_LB_BACKEND_GONE && f->proto == IPPROTO_TCP && !(f->tcp_flags & XO_TCP_RST)) {
            xo_mac_copy(reset->mac, self->mac);
            reset->send = 1;
        }
        if (lb < 0)
            return lb;
        if (lb == XO_LB_DNAT)
            daddr = f->daddr;
    }
    /* Only a backend's packets can be replies: of a service's connections, or of the
     * routing mesh's. */
    int reply = has_flow && lb == XO_LB_NOT_SERVICE && (self_flags & XO_EP_SERVICE_BACKEND);

    if (!dst) {
        if (reply) {
            struct xo_config *cfg = xo_get_config();
            __u8 mac[ETH_ALEN];
            xo_mac_copy(mac, self->mac);
            ret = cfg ? xo_mesh_reply(skb, cfg, vni, f, mac) : XO_MESH_NOT_MESH;
            if (ret != XO_MESH_NOT_MESH) {
                /* Sent, or given up on the way out: either way the container sent it. */
                xo_count_tx(xo_endpoint_traffic(self_slot), len);
                return ret;
            }
        }
        ret = xo_unroutable(vni, daddr);
        if (ret != -XO_DROP_NO_ROUTE)
            return ret;
        return xo_to_outside(skb, self_flags, self_slot, daddr, len);
    }

    xo_count_tx(xo_endpoint_traffic(self_slot), len);
    if (dst->ifindex)
        return xo_to_local_endpoint(skb, dst, f, reply, len);
    return xo_to_remote_endpoint(skb, dst, vni, self->mac);
}

int xo_endpoint_ingress(struct __sk_buff *skb)
{
    __u32 len = skb->len;
    struct xo_flow f = {};
    struct xo_reset_to reset;
    reset.send = 0;
    int ret = xo_from_container(skb, len, &f, &reset);
    if (ret >= 0)
        return ret;
    xo_drop(skb, XO_HOOK_ENDPOINT, -ret, len);
    /* Counted (and told) first, as the client sent it: the reset rewrites it. */
    if (reset.send)
        return xo_lb_reset(skb, &f, reset.mac, skb->ingress_ifindex);
    return TC_ACT_SHOT;
}
