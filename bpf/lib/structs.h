/* The layout of every map entry xoverlay shares between kernel and control, and the
 * values of their fields. xoverlay/maps/layout.py mirrors these structs and reads the XO_CFG_,
 * XO_EP_ and XO_NO_ lines; tests/test_layout.py compiles the programs and checks every
 * size and field offset against it. Change both or the test fails. */
#ifndef XO_STRUCTS_H
#define XO_STRUCTS_H

#include "common.h"
#include "drop.h"
#include "events.h"

/* This node, written once by the agent at start. */
struct xo_config {
    __be32 node_ip;           /* our underlay IPv4 address */
    __u32 underlay_ifindex;   /* where encapsulated packets leave */
    __be16 vxlan_port;        /* UDP destination port, 4789 unless configured */
    __u16 flags;              /* XO_CFG_* */
    __u32 gateway_ifindex;    /* the node's xo-gw, holding 169.254.1.1: DNS goes there */
    __u64 build_id;           /* hash of the BPF sources that were loaded */
};

/* Config flags. xoverlay/maps/layout.py reads these lines (one definition). */
#define XO_CFG_FIB_MAIN_ONLY 0x1  /* no policy rule routes our packets: underlay routes from main */
#define XO_CFG_EGRESS 0x2         /* the node masquerades what enters xo-gw for the outside (its nftables table is in place) */

/* Endpoint flags: the service lookups the data path may skip for an endpoint, and its
 * network's policy. xoverlay/maps/layout.py
 * reads these lines (one definition). */
#define XO_EP_NETWORK_HAS_SERVICES 0x1  /* its network has a service: look for VIPs */
#define XO_EP_SERVICE_BACKEND 0x2       /* it backs a service: its replies may need reverse NAT */
#define XO_EP_NETWORK_INTERNAL 0x4      /* its network is --internal: nothing leaves the overlay */

/* Counters are per-CPU arrays indexed by a slot the agent gives each local endpoint,
 * peer and service backend, kept in their entries (a service's is its id): the program
 * has the entry already, and an array lookup is inlined by the verifier where a hash
 * lookup was a helper call (two per packet, ~60-100 ns of each program: measured). */
#define XO_NO_SLOT 0xffffffff     /* counts nowhere: no array has it */

/* An endpoint of a network, anywhere in the cluster. */
struct xo_endpoint_key {
    __u32 vni;
    __be32 ip;
};
struct xo_endpoint {
    __be32 node_ip;           /* underlay IP of the node it lives on */
    __u32 ifindex;            /* host-side veth, when it lives on this node; else 0 */
    __u8 mac[6];              /* its own MAC */
    __u16 flags;              /* XO_EP_* */
    __u32 slot;               /* its counters: local, in xo_endpoint_stats; remote, its node's in xo_peer_stats */
};

/* The endpoint behind a host-side veth, for the source check on what it sends. */
struct xo_local_endpoint {
    __u32 vni;
    __be32 ip;
    __u8 mac[6];
    __u16 flags;              /* XO_EP_* */
    __u32 slot;               /* its counters in xo_endpoint_stats */
};

/* An overlay network's subnet, to tell "another network" from "no such address". */
struct xo_subnet_key {
    __u32 prefixlen;          /* LPM trie: bits that follow */
    __be32 addr;
};
struct xo_subnet {
    __u32 vni;
};

/* A peer node, keyed by its underlay IP. */
struct xo_peer {
    __u32 flags;
    __u32 slot;               /* its counters in xo_peer_stats */
};

/* A VNI with at least one endpoint on this node. */
struct xo_vni {
    __u32 flags;
};

/* Per-CPU traffic counters, per peer and per local endpoint (by slot). */
struct xo_traffic {
    __u64 tx_packets;
    __u64 tx_bytes;
    __u64 rx_packets;
    __u64 rx_bytes;
    __u64 last_rx_ns;         /* peers only: CLOCK_MONOTONIC (coarse) of the last rx, "last packet seen" */
};

/* Per-CPU drop counters, indexed by enum xo_drop_reason. */
struct xo_drop_count {
    __u64 packets;
    __u64 bytes;
};

/* --- services (bpf/lib/lb.h) --- */

/* A service port: VIP:port/protocol in the network of the client (VNI). */
struct xo_lb_service_key {
    __u32 vni;
    __be32 vip;
    __be16 port;
    __u8 proto;               /* IPPROTO_TCP or IPPROTO_UDP */
    __u8 pad;
};
#define XO_LB_AFFINITY 1      /* pick the backend from the client IP alone */
struct xo_lb_service {
    __u32 id;                 /* slot in xo_lb_maglev, and the first half of a backend key */
    __u32 flags;              /* XO_LB_* */
};

/* A backend of a service: (service id, backend index), never reused within a service. */
struct xo_lb_backend_key {
    __u32 service;
    __u32 index;
};
#define XO_LB_ACTIVE 1
#define XO_LB_DRAINING 2      /* keeps its connections, is in no Maglev table */
struct xo_lb_backend {
    __be32 ip;
    __be16 port;              /* target port; 0: the port the client asked for */
    __u8 state;               /* XO_LB_ACTIVE or XO_LB_DRAINING */
    __u8 pad;
    __u32 slot;               /* its counters in xo_lb_backend_stats */
    /* Where it is: a copy of its endpoint's entry in xo_endpoints (node_ip 0: nowhere
     * yet, a local endpoint not plumbed). The agent writes both from the same state, so
     * a service packet needs no second lookup to find where its backend is. */
    struct xo_endpoint where;
};

/* Connection table. Two entries per connection, both on the client's node:
 *   XO_CT_SERVICE  client -> VIP:vport       : which backend (service, index)
 *   XO_CT_REPLY    backend:port -> client    : the VIP:vport to put back (reverse NAT)
 * A routing-mesh connection (an outside client to a node's IP:published port) has the
 * same two on the node it came in through (VIP:vport = node IP:published port), and,
 * when its backend is on another node, one more on the backend's node:
 *   XO_CT_MESH     backend:port -> client    : `vip` = the node it came in through, where
 *                                              its replies are sent back (in VXLAN) */
#define XO_CT_SERVICE 1
#define XO_CT_REPLY 2
#define XO_CT_MESH 3
struct xo_ct_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 dir;                 /* XO_CT_SERVICE or XO_CT_REPLY */
    __u16 pad;
};
struct xo_ct {
    __u32 service;
    __u32 backend;
    __be32 vip;               /* XO_CT_REPLY: source to restore */
    __be16 vport;
    __u16 pad;
};

/* Per-CPU counters per service (by id) and per backend (by slot), counted on the
 * client's node. */
struct xo_lb_stats {
    __u64 packets;            /* client -> service */
    __u64 bytes;
    __u64 connections;        /* new connections (backend choices) */
};

/* A published port (the routing mesh): TCP/UDP to this node's underlay IP on `port`. */
struct xo_mesh_key {
    __be16 port;              /* the published port */
    __u8 proto;               /* IPPROTO_TCP or IPPROTO_UDP */
    __u8 pad;
};
struct xo_mesh {
    __u32 service;            /* service id: its Maglev table and backends */
    __u32 flags;              /* XO_LB_* */
    __u32 vni;                /* the service's network */
    __be16 port;              /* the service port it publishes (a backend's default target) */
    __u16 pad;
};

/* The switch of `xoverlay monitor`: one entry, all zero while no monitor runs. The data
 * path reads `events` before writing any event, and does nothing else for the monitor
 * when it is 0. A monitor sets it at start and clears it on exit (also on Ctrl-C and
 * SIGTERM); one killed with SIGKILL leaves it set: `pid`/`pid_start` tell that it is
 * stale (status lints it) and the agent or the next monitor clears it. */
struct xo_monitor {
    __u32 events;             /* XO_MON_*: what the monitor wants; 0: no monitor */
    __u32 sample;             /* forwarded packets: one in `sample` is told (0, 1: all) */
    __u32 pid;                /* the monitor's process */
    __u32 pad;
    __u64 pid_start;          /* its start time (/proc/PID/stat field 22, clock ticks) */
    __u64 lost;               /* events not written because the ring buffer was full */
};

/* One event in xo_events, for `xoverlay monitor`. Addresses and ports are as on the
 * wire (network order); `flags` says which fields the program could fill in. */
struct xo_event {
    __u64 ts_ns;              /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u8 type;                /* enum xo_event_type */
    __u8 hook;                /* enum xo_hook: the program that wrote it */
    __u8 reason;              /* DROP: enum xo_drop_reason; FORWARD: enum xo_fwd_action */
    __u8 protocol;            /* IPv4 protocol of the (inner) packet */
    __u16 flags;              /* XO_EVF_* */
    __be16 ethertype;         /* of the (inner) frame; 0 if not even an Ethernet header */
    __u32 ifindex;            /* the device it arrived on */
    __u32 len;                /* the whole frame, as the counters count it */
    __u32 vni;                /* XO_EVF_VNI: the network */
    __be32 outer_saddr;       /* XO_EVF_OUTER: the frame's IPv4 header, on the underlay */
    __be32 outer_daddr;
    __be32 saddr;             /* XO_EVF_IP: the (inner) IPv4 packet */
    __be32 daddr;
    __be16 sport;             /* XO_EVF_PORTS: TCP/UDP ports, ICMP type and code */
    __be16 dport;
    __be32 xlate_daddr;       /* XO_EVF_XLATE: translated destination (services) */
    __be16 xlate_dport;
    __u16 pad;
};

#endif
