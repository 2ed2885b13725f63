/* What `xoverlay monitor` can be told, and by whom: the one definition of event types,
 * program hooks and forwarding actions. xoverlay/maps/events.py parses these lines, as
 * xoverlay/maps/drops.py parses drop.h, so a value added here is named everywhere.
 * Format, one per line: XO_<LIST>(NAME, number, "what it means, in plain words") */
#ifndef XO_EVENTS_H
#define XO_EVENTS_H

/* struct xo_event.type. Numbers are fixed: the services branch owns 3. */
#define XO_EVENT_TYPES(XO_EVENT) \
    XO_EVENT(DROP, 1, "a packet was dropped") \
    XO_EVENT(FORWARD, 2, "a packet was forwarded (sampled: monitor --sample N)") \
    XO_EVENT(SERVICE_CONN, 3, "a new connection to a service VIP (client -> VIP -> backend)")

/* struct xo_event.hook: the program that wrote the event, named for its attach point. */
#define XO_HOOKS(XO_HOOK) \
    XO_HOOK(ENDPOINT, 1, "tc ingress of an endpoint's host-side veth (bpf/endpoint.c)") \
    XO_HOOK(UNDERLAY_TC, 2, "tc ingress of the underlay device (bpf/underlay_tc.c)") \
    XO_HOOK(UNDERLAY_XDP, 3, "XDP on the underlay device (bpf/underlay_xdp.c)") \
    XO_HOOK(LOOPBACK, 4, "tc ingress of the node's loopback device (bpf/loopback.c)") \
    XO_HOOK(TUNNEL_DEVICE, 5, "tc ingress of xo-gro, the idle VXLAN device that gives GRO a tunnel socket (bpf/underlay_tc.c)")

/* struct xo_event.reason of a FORWARD event: where the packet went. */
#define XO_FWD_ACTIONS(XO_FWD) \
    XO_FWD(LOCAL, 1, "delivered to another endpoint of this node") \
    XO_FWD(ENCAP, 2, "encapsulated and sent to a peer node") \
    XO_FWD(DECAP, 3, "decapsulated and delivered to an endpoint of this node") \
    XO_FWD(EGRESS, 4, "handed to the node's stack for outside the overlay (masqueraded there)") \
    XO_FWD(ARP, 5, "an endpoint's ARP request answered with the gateway's MAC, back to it")

enum xo_event_type {
#define XO_EVENT_ENUM(name, num, text) XO_EVENT_##name = num,
    XO_EVENT_TYPES(XO_EVENT_ENUM)
#undef XO_EVENT_ENUM
};

enum xo_hook {
#define XO_HOOK_ENUM(name, num, text) XO_HOOK_##name = num,
    XO_HOOKS(XO_HOOK_ENUM)
#undef XO_HOOK_ENUM
};

enum xo_fwd_action {
#define XO_FWD_ENUM(name, num, text) XO_FWD_##name = num,
    XO_FWD_ACTIONS(XO_FWD_ENUM)
#undef XO_FWD_ENUM
};

/* struct xo_event.flags: which fields the program could fill in. */
#define XO_EVF_OUTER 0x1      /* outer_saddr/outer_daddr: the frame's own IPv4 header on the underlay */
#define XO_EVF_VNI 0x2        /* vni */
#define XO_EVF_IP 0x4         /* saddr/daddr/protocol: the (inner) IPv4 packet */
#define XO_EVF_PORTS 0x8      /* sport/dport: TCP/UDP ports, or ICMP type/code */
#define XO_EVF_XLATE 0x10     /* xlate_daddr/xlate_dport (services: the backend chosen) */

/* struct xo_monitor.events: what the running monitor asked for (0: no monitor). */
#define XO_MON_DROPS 0x1
#define XO_MON_FORWARDS 0x2
#define XO_MON_SERVICES 0x4

#endif
