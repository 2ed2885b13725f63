/* ARP from a container, answered as Cilium's bpf_lxc answers it: every address the
 * container asks for, other than its own, is at the gateway's MAC (XO_GW_MAC), which
 * every host-side veth carries. A container whose address has its network's prefix (a
 * connected route, as Docker's network plugin sets it up) and no permanent neighbour
 * for its gateway ARPs for the gateway and for every peer of its subnet; each answer
 * sends its packets to the endpoint program like the rest. xoverlay's own plumbing
 * (a permanent neighbour for XO_GW_IP, no prefix route) never ARPs. */
#ifndef XO_ARP_H
#define XO_ARP_H

#include "common.h"
#include "counters.h"
#include "monitor.h"
#include "parsing.h"

/* The ARP frame of the endpoint `self` behind veth `ifindex`, the cursor past its
 * Ethernet header `eth` (`len` bytes in all). Returns the verdict or -reason.
 *
 * Answered: a request for IPv4 over Ethernet whose senders (Ethernet source, sha, spa)
 * are the endpoint's own, for any address but its own. The Ethernet destination is not
 * judged: broadcast, or our MAC when the container re-checks an entry it has (the
 * kernel's probe of a stale neighbour is unicast). The request is rewritten in place
 * into the reply and sent out of the same veth (`ifindex`, the one it came in on and
 * `self` was found by; skb->ifindex names the same device here), into the container:
 * bpf_redirect to its egress, as Cilium does. The veth hands the reply to the container's
 * eth0 as any frame off its wire (eth_type_trans: PACKET_HOST). bpf_redirect_peer would
 * save that hop, which is nothing for ARP, but keeps the request's pkt_type (broadcast)
 * before Linux 6.15, and the kernel takes a reply that is not PACKET_HOST as no proof
 * of reachability (STALE, not REACHABLE).
 *
 * A sender address that is not the endpoint's own is SPOOFED_SOURCE, as for an IPv4
 * packet: claiming another's address is what ARP spoofing is, and one reason counts all
 * of a container's lies. 0.0.0.0 is no lie: a probe's "no address yet" (RFC 5227).
 * Everything else ARP is ARP_NOT_ANSWERED: replies, probes, announcements of its own
 * address (gratuitous ARP: nobody else is on the link to tell), other formats, frames
 * cut short. */
static __always_inline int xo_arp_answer(struct __sk_buff *skb, struct xo_cursor *c, struct ethhdr *eth,
                                         const struct xo_local_endpoint *self, __u32 ifindex, __u32 len)
{
    struct xo_arphdr *arp;
    int op = xo_parse_arp(c, &arp);
    if (op < 0)
        return op;
    if (arp->htype != bpf_htons(XO_ARP_HTYPE_ETHER) || arp->ptype != bpf_htons(ETH_P_IP) ||
        arp->hlen != ETH_ALEN || arp->plen != 4)
        return -XO_DROP_ARP_NOT_ANSWERED;
    __be32 sender = arp->spa;
    if (!xo_mac_equal(eth->h_source, self->mac) || !xo_mac_equal(arp->sha, self->mac) ||
        (sender != self->ip && sender != 0))
        return -XO_DROP_SPOOFED_SOURCE;
    __be32 target = arp->tpa;
    if (op != bpf_htons(XO_ARP_REQUEST) || sender == 0 || target == self->ip)
        return -XO_DROP_ARP_NOT_ANSWERED;

    /* The requester is the endpoint itself (checked above): the reply goes to its own
     * addresses, from the gateway's MAC at the address it asked for. */
    __u8 gw[ETH_ALEN] = XO_GW_MAC;
    xo_mac_copy(eth->h_dest, self->mac);
    xo_mac_copy(eth->h_source, gw);
    arp->op = bpf_htons(XO_ARP_REPLY);
    xo_mac_copy(arp->tha, self->mac);
    arp->tpa = sender;
    xo_mac_copy(arp->sha, gw);
    arp->spa = target;

    /* Counted as a local delivery is, whose receiver here is the sender: sent and
     * received, both `len` bytes (the reply is the request rewritten). */
    struct xo_traffic *t = xo_endpoint_traffic(self->slot);
    xo_count_tx(t, len);
    xo_count_rx(t, len);
    xo_tell_forward(skb, XO_HOOK_ENDPOINT, XO_FWD_ARP, len);
    return bpf_redirect(ifindex, 0);
}

#endif
