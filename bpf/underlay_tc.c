/* tc ingress on the underlay device: decapsulate VXLAN for local endpoints and deliver
 * it into the container (redirect_peer skips the host stack and a second veth hop),
 * reverse-NATing replies of service backends on the way (lib/lb.h); and the routing
 * mesh (lib/mesh.h): packets to a published port that XDP left to us (local backends,
 * or all of them without XDP), and the mesh's tunnelled requests and replies.
 * Does the same checks as the XDP program, which may be off (up --no-xdp), and more:
 * the inner source must be an endpoint of the peer that sent it (or, for a mesh
 * request, an address outside every overlay network). */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/monitor.h"
#include "lib/parsing.h"
#include "lib/vxlan.h"
#include "lib/lb.h"
#include "lib/mesh.h"
#include "lib/deliver.h"

/* A tunnel packet given up (`fail`: -reason) before its sender and VNI were looked up:
 * those checks come first in the reasons' order (lib/vxlan.h), so they name the drop if
 * they fail. Returns -reason. */
static __always_inline int xo_unproven(void *data, void *data_end, __u32 len, const struct xo_config *cfg,
                                       struct xo_tunnel *t, int fail)
{
    int first = xo_classify_underlay(data, data_end, len, cfg, t, 1);
    return first < 0 ? first : fail;
}

/* A frame of `len` bytes from the underlay. Returns the tc verdict or -reason. */
static __always_inline int xo_from_underlay_tc(struct __sk_buff *skb, const struct xo_config *cfg, __u32 len)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct xo_tunnel t = {};
    /* The sender's and the VNI's map lookups wait: the endpoint lookups below prove both
     * for the packets that matter (see `proven`). */
    int ret = xo_classify_underlay(data, data_end, len, cfg, &t, 0);
    if (ret == XO_NOT_VXLAN)
        return xo_mesh_tc(skb, cfg);
    if (ret < 0)
        return xo_unproven(data, data_end, len, cfg, &t, ret);

    /* The inner packet: IPv4, from and to endpoints of its VNI. */
    struct xo_cursor c = { .pos = t.inner_eth, .end = data_end };
    struct ethhdr *inner_eth;
    if (xo_parse_eth(&c, &inner_eth) != bpf_htons(ETH_P_IP))
        return xo_unproven(data, data_end, len, cfg, &t, -XO_DROP_INNER_NOT_IPV4);
    struct iphdr *inner_ip;
    ret = xo_parse_ipv4(&c, &inner_ip);
    if (ret < 0)
        return xo_unproven(data, data_end, len, cfg, &t, ret);

    struct xo_endpoint_key src_key = { .vni = t.vni, .ip = inner_ip->saddr };
    struct xo_endpoint_key dst_key = { .vni = t.vni, .ip = inner_ip->daddr };
    struct xo_endpoint *src = xo_endpoints.lookup(&src_key);
    struct xo_endpoint *dst = xo_endpoints.lookup(&dst_key);
    /* The agent writes xo_peers and xo_vnis from the endpoints it writes: the node of a
     * remote endpoint is a peer, and a VNI with a local endpoint is in use here. Anything
     * else (our own address as the sender, say) takes the lookups, and their drop
     * reasons, first. */
    int proven = !t.mesh && src && !src->ifindex && src->node_ip == t.peer_ip && dst && dst->ifindex;
    if (!proven) {
        ret = xo_classify_underlay(data, data_end, len, cfg, &t, 1);
        if (ret < 0)
            return ret;
    }
    /* A mesh request: an outside client's packet for a backend here. A mesh reply: a
     * backend's packet for an outside client that talked to this node. */
    int mesh_request = t.mesh && dst && dst->ifindex;
    int mesh_reply = t.mesh && !mesh_request;
    if (mesh_request) {
        if (xo_is_overlay(inner_ip->saddr))
            return -XO_DROP_INNER_SPOOFED;
    } else if (!src || src->node_ip != t.peer_ip) {
        return -XO_DROP_INNER_SPOOFED;
    }
    if (!mesh_reply && (!dst || !dst->ifindex))
        return -XO_DROP_UNKNOWN_DESTINATION;
    __u16 src_flags = src ? src->flags : 0;
    __u32 ifindex = 0, dst_slot = XO_NO_SLOT;
    __u8 dst_mac[ETH_ALEN] = {};
    if (!mesh_reply) {
        ifindex = dst->ifindex;
        dst_slot = dst->slot;
        xo_mac_copy(dst_mac, dst->mac);
    }

    /* Proven, the sender is the source endpoint's node, whose counters it names. */
    xo_count_peer_rx(xo_peer_traffic(proven ? src->slot : t.peer_slot), len);

    xo_tell_forward(skb, XO_HOOK_UNDERLAY_TC, XO_FWD_DECAP, len);
    ret = xo_vxlan_decap(skb);
    if (ret < 0)
        return ret;
    /* The outer Ethernet header is now in front of the inner IP packet: make it the
     * one the container expects, from its gateway (its EtherType, IPv4, was checked). */
    ret = xo_eth_from_gateway(skb, dst_mac, -XO_DROP_DECAP_FAILED);
    if (ret < 0)
        return ret;

    data = (void *)(long)skb->data;
    data_end = (void *)(long)skb->data_end;
    struct xo_cursor ic = { .pos = data, .end = data_end };
    struct ethhdr *eth;
    struct iphdr *ip;
    struct xo_flow f = {};
    int has_flow = xo_parse_eth(&ic, &eth) >= 0 && xo_parse_ipv4(&ic, &ip) >= 0 && xo_flow_parse(data, ip, ic, &f);

    if (mesh_reply) {
        /* Source := this node's IP:published port, the address the client talked to;
         * then out of the underlay to it. */
        if (!has_flow)
            return -XO_DROP_MESH_NO_CONNECTION;
        ret = xo_lb_reverse_nat(skb, &f);
        if (ret < 0)
            return ret;
        if (!ret)
            return -XO_DROP_MESH_NO_CONNECTION;
        return xo_mesh_reply_out(skb, cfg, f.daddr);
    }
    if (mesh_request) {
        if (has_flow)
            xo_mesh_remember(&f, t.peer_ip);
    } else if (has_flow && (src_flags & XO_EP_SERVICE_BACKEND)) {
        /* A reply from a service backend on another node, for a client here: the
         * client must see the VIP it talked to. Only a backend's packets can be such
         * replies. */
        ret = xo_lb_reverse_nat(skb, &f);
        if (ret < 0)
            return ret;
    }
    return xo_redirect_local(skb, ifindex, xo_endpoint_traffic(dst_slot), skb->len);
}

/* The most this program reads from the front of a frame: outer Ethernet, IPv4 with
 * options, UDP, VXLAN, inner Ethernet, IPv4 with options, and the inner TCP header up to
 * its flags (a mesh request without VXLAN needs less). */
#define XO_HEADERS_MAX (ETH_HLEN + 60 + 8 + 8 + ETH_HLEN + 60 + 20)

int xo_underlay_ingress(struct __sk_buff *skb)
{
    struct xo_config *cfg = xo_get_config();
    if (!cfg)
        return TC_ACT_OK;
    __u32 len = skb->len;
    /* A NIC may hand over a frame with only its first bytes in the skb's linear part
     * (virtio-net's mergeable buffers: the Ethernet header alone, the rest in pages),
     * and direct packet access sees only that part: every full-size VXLAN frame was
     * dropped as TRUNCATED_UDP there. Pull the headers in first; a frame already linear
     * that far costs one comparison. */
    __u32 want = len < XO_HEADERS_MAX ? len : XO_HEADERS_MAX;
    if ((long)skb->data_end - (long)skb->data < (long)want)
        bpf_skb_pull_data(skb, want);        /* if it fails, the parsers drop the frame as cut short */
    int ret = xo_from_underlay_tc(skb, cfg, len);
    if (ret >= 0)
        return ret;
    return xo_drop(skb, XO_HOOK_UNDERLAY_TC, -ret, len);
}

/* tc ingress on xo-gro: a collect-metadata VXLAN device on our port that the agent keeps
 * up and idle. Its UDP socket is what lets GRO merge tunnel frames (the kernel merges a
 * UDP flow's inner packets only for a socket with a tunnel GRO handler), so a TCP stream
 * from another node reaches the program above in 64 KB aggregates rather than 1,450-byte
 * segments. The program above decides every frame of the underlay before the socket
 * could; a frame that still gets here was decapsulated by the kernel, unchecked, after
 * arriving through another device: it is dropped, counted. */
int xo_tunnel_device_ingress(struct __sk_buff *skb)
{
    return xo_drop(skb, XO_HOOK_TUNNEL_DEVICE, XO_DROP_TUNNEL_DEVICE, skb->len);
}
