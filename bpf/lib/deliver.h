/* Into a container on this node: the last step of local traffic, of decap and of the
 * routing mesh's requests for a local backend.
 *
 * The container gets the frame as if its gateway had sent it (every container has a
 * permanent neighbour entry for XO_GW_MAC), straight into its network namespace:
 * bpf_redirect_peer skips the host-side veth's second hop and the host's stack. */
#ifndef XO_DELIVER_H
#define XO_DELIVER_H

#include "common.h"
#include "counters.h"

/* The frame's Ethernet header becomes the gateway's to the container: to `mac`, from
 * XO_GW_MAC. Returns 0, or `fail` (-reason) for a frame without an Ethernet header,
 * which the callers have seen (the reason names the step that would have lost it). */
static __always_inline int xo_eth_from_gateway(struct __sk_buff *skb, const __u8 *mac, int fail)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return fail;
    __u8 gw[ETH_ALEN] = XO_GW_MAC;
    xo_mac_copy(eth->h_dest, mac);
    xo_mac_copy(eth->h_source, gw);
    return 0;
}

/* Into the container behind host-side veth `ifindex`, counted in `rx` (its counters) as
 * `bytes` received. Returns the verdict. */
static __always_inline int xo_redirect_local(struct __sk_buff *skb, __u32 ifindex, struct xo_traffic *rx,
                                             __u32 bytes)
{
    xo_count_rx(rx, bytes);
    return bpf_redirect_peer(ifindex, 0);
}

/* Both: local delivery of the frame at skb to the container behind `ifindex`, whose MAC
 * is `mac`. Returns the verdict or `fail` (see xo_eth_from_gateway). */
static __always_inline int xo_deliver_local(struct __sk_buff *skb, __u32 ifindex, const __u8 *mac,
                                            struct xo_traffic *rx, __u32 bytes, int fail)
{
    int ret = xo_eth_from_gateway(skb, mac, fail);
    if (ret < 0)
        return ret;
    return xo_redirect_local(skb, ifindex, rx, bytes);
}

#endif
