/* Out of the underlay: the next hop from the kernel's routing table, the MACs from its
 * neighbour table.
 *
 * bpf_redirect_neigh() without a next hop routes the packet itself: a full output route
 * (policy rules, xfrm, a dst for the skb), measured at about a third of what the encap
 * path costs on top of plain routing. Here bpf_fib_lookup() finds only the next hop
 * (SKIP_NEIGH: the neighbour code still resolves and refreshes the MAC), and only in the
 * main table when the agent found no policy rule that could route our packets elsewhere
 * (XO_CFG_FIB_MAIN_ONLY). */
#ifndef XO_ROUTE_H
#define XO_ROUTE_H

#include "common.h"
#include "maps.h"
#include "counters.h"

/* Kernel 6.3+; BCC 0.26's headers predate it. */
#define XO_FIB_LOOKUP_SKIP_NEIGH (1U << 2)

/* The flags of an underlay route lookup (egress: the underlay is the output device). */
static __always_inline __u32 xo_fib_flags(const struct xo_config *cfg)
{
    return BPF_FIB_LOOKUP_OUTPUT | ((cfg->flags & XO_CFG_FIB_MAIN_ONLY) ? BPF_FIB_LOOKUP_DIRECT : 0);
}

/* Send the packet at skb (an IPv4 frame from this node: a tunnel packet to dst, or a mesh
 * reply to an outside client dst) out of the underlay. Returns the tc verdict, or
 * -XO_DROP_UNDERLAY_UNREACHABLE for a route that refuses dst (blackhole, unreachable,
 * prohibit). */
static __always_inline int xo_redirect_underlay(struct __sk_buff *skb, const struct xo_config *cfg, __be32 dst)
{
    struct bpf_fib_lookup fib = {};
    fib.family = 2;               /* AF_INET */
    fib.ipv4_src = cfg->node_ip;
    fib.ipv4_dst = dst;
    fib.ifindex = cfg->underlay_ifindex;
    long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), xo_fib_flags(cfg) | XO_FIB_LOOKUP_SKIP_NEIGH);
    if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
        struct bpf_redir_neigh nh = {};
        nh.nh_family = 2;
        nh.ipv4_nh = fib.ipv4_dst;    /* the gateway, or dst itself when on-link */
        return xo_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
    }
    if (rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE ||
        rc == BPF_FIB_LKUP_RET_PROHIBIT)
        return -XO_DROP_UNDERLAY_UNREACHABLE;
    /* No route at all, one the lookup cannot follow (too big for the device, a tunnel
     * route), or an underlay that does not forward (the lookup answers only for a device
     * that does: lint underlay-not-forwarding): the kernel's output route decides, as
     * for any packet of the node's. (Given the underlay as the output device, it takes an
     * address it has no route for as on-link: how xoverlay always sent.) */
    return xo_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

/* The same, and counted as sent to the peer whose counters are `sent` (NULL: none) if it
 * was: what every tunnel packet of ours ends with. */
static __always_inline int xo_send_underlay(struct __sk_buff *skb, const struct xo_config *cfg, __be32 dst,
                                            struct xo_traffic *sent)
{
    int ret = xo_redirect_underlay(skb, cfg, dst);
    if (ret == TC_ACT_REDIRECT)
        xo_count_tx(sent, skb->len);
    return ret;
}

#endif
