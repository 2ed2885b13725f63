/* Drop reasons: the one definition. xoverlay reads this list (xoverlay/maps/drops.py parses
 * the XO_DROP lines), so a reason added here is named and explained everywhere.
 * Format, one per line: XO_DROP(NAME, number, "what happened, in plain words")
 *
 * How every function of the data path answers, as Cilium's do: a negative value is a
 * drop, minus its reason (-XO_DROP_MALFORMED_IP); zero or more is success, and what it
 * means is the function's: a verdict (TC_ACT_OK/SHOT/REDIRECT, XDP_*: all >= 0; never
 * TC_ACT_UNSPEC) from what decides the packet's fate, 0 (or a kind, a flag, a header
 * field) from a step. A reason never looks like a verdict, a failed step is passed up
 * with `if (ret < 0) return ret;`, and each program's entry function counts and reports
 * a drop once, at its one exit (xo_drop, lib/monitor.h), under the reason that came up. */
#ifndef XO_DROP_H
#define XO_DROP_H

#define XO_DROP_REASONS(XO_DROP) \
    XO_DROP(UNKNOWN_INTERFACE, 1, "packet on a veth that belongs to no endpoint") \
    XO_DROP(NOT_IPV4, 2, "endpoint sent a frame that is neither IPv4 nor ARP (IPv6, a VLAN tag, ...)") \
    XO_DROP(MALFORMED_IP, 3, "IPv4 header truncated or with a bad header length") \
    XO_DROP(SPOOFED_SOURCE, 4, "endpoint used a source IP or MAC that is not its own") \
    XO_DROP(OTHER_NETWORK, 5, "destination is an address of another network") \
    XO_DROP(UNKNOWN_DESTINATION, 6, "no endpoint has that address in this network") \
    XO_DROP(NO_ROUTE, 7, "destination is outside every overlay network and cannot leave: egress is not set up on this node (status says why), or not a unicast address") \
    XO_DROP(ENCAP_FAILED, 8, "could not make room for the VXLAN headers") \
    XO_DROP(UNKNOWN_PEER, 9, "VXLAN from an address that is not a peer node") \
    XO_DROP(UNKNOWN_VNI, 10, "VXLAN with a VNI not in use on this node") \
    XO_DROP(TRUNCATED_UDP, 11, "UDP header truncated or with a bad length") \
    XO_DROP(TRUNCATED_VXLAN, 12, "VXLAN packet too short for its headers") \
    XO_DROP(BAD_VXLAN_FLAGS, 13, "VXLAN header without the valid-VNI flag") \
    XO_DROP(OUTER_FRAGMENT, 14, "fragmented VXLAN packet (we always send DF)") \
    XO_DROP(OUTER_IP_OPTIONS, 15, "VXLAN packet with IP options (we never send them)") \
    XO_DROP(INNER_NOT_IPV4, 16, "tunnelled frame is not IPv4") \
    XO_DROP(INNER_SPOOFED, 17, "tunnelled source is not an endpoint of the sending peer") \
    XO_DROP(DECAP_FAILED, 18, "could not remove the VXLAN headers") \
    XO_DROP(OUTER_CHECKSUM, 19, "VXLAN packet whose outer IPv4 header checksum is wrong") \
    XO_DROP(LB_BACKEND_GONE, 20, "service connection whose backend was removed (TCP: client gets a reset)") \
    XO_DROP(LB_NO_BACKEND, 21, "new connection to a service with no active backend (other than the client itself)") \
    XO_DROP(LB_NAT_FAILED, 22, "could not rewrite a service packet's address (kernel refused)") \
    XO_DROP(MESH_OVERLAY_SOURCE, 23, "packet to a published port from an address of an overlay network") \
    XO_DROP(MESH_NO_CONNECTION, 24, "routing-mesh reply for a connection this node has no entry for") \
    XO_DROP(MESH_TOO_BIG, 25, "routing-mesh packet too big for the underlay once VXLAN-encapsulated") \
    XO_DROP(UNDERLAY_UNREACHABLE, 26, "the underlay's routing has a blackhole, unreachable or prohibit route to the peer") \
    XO_DROP(EGRESS_INTERNAL, 27, "destination is outside the overlay, and the endpoint's network is --internal (no way out)") \
    XO_DROP(TUNNEL_DEVICE, 28, "VXLAN decapsulated by the kernel's socket on our port, not by our program: it came in through another device than the underlay (xo-gro holds that socket only so that GRO merges tunnel frames)") \
    XO_DROP(ARP_NOT_ANSWERED, 29, "ARP from the endpoint that is not a request from its own addresses for another address: a reply, an announcement or probe of its own address, not Ethernet/IPv4, or cut short (a sender address not its own is SPOOFED_SOURCE)")

enum xo_drop_reason {
    XO_DROP_NONE = 0,
#define XO_DROP_ENUM(name, num, text) XO_DROP_##name = num,
    XO_DROP_REASONS(XO_DROP_ENUM)
#undef XO_DROP_ENUM
    XO_DROP_MAX = 32, /* size of the drop counter array */
};

#endif
