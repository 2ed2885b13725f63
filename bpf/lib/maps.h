/* Every map xoverlay shares between kernel and control, declared once, each with what it
 * holds (the layout of their entries: structs.h; the counters' helpers: counters.h).
 *
 * All maps are pinned under XO_PIN_DIR (one directory per node: bpffs is shared by every
 * network namespace), so they outlive the agent and every program reuses them. */
#ifndef XO_MAPS_H
#define XO_MAPS_H

#include "common.h"
#include "structs.h"

/* The counter arrays' sizes: the slots the agent can hand out. */
#define XO_MAX_LOCAL_ENDPOINTS 4096
#define XO_MAX_PEERS 1024
#define XO_LB_MAX_SERVICES 16384
#define XO_LB_MAX_BACKENDS 65536

#define XO_EVENTS_BYTES (256 * 1024)

#define XO_MAP(type, key, value, name, max) \
    BPF_TABLE_PINNED(type, key, value, name, max, XO_PIN_DIR "/" #name)
#define XO_MAP_F(type, key, value, name, max, flags) \
    BPF_TABLE_PINNED(type, key, value, name, max, XO_PIN_DIR "/" #name, flags)

/* The node's own settings: one entry. */
XO_MAP("array", __u32, struct xo_config, xo_config, 1);
/* Every endpoint of every network, local and remote: where to send a packet. */
XO_MAP("hash", struct xo_endpoint_key, struct xo_endpoint, xo_endpoints, 65536);
/* Local endpoints by host-side veth ifindex: who may send from that veth. */
XO_MAP("hash", __u32, struct xo_local_endpoint, xo_local_endpoints, XO_MAX_LOCAL_ENDPOINTS);
/* Network subnets -> VNI, longest prefix match. */
XO_MAP_F("lpm_trie", struct xo_subnet_key, struct xo_subnet, xo_subnets, 1024, BPF_F_NO_PREALLOC);
/* Peer nodes by underlay IP: VXLAN from anyone else is dropped. */
XO_MAP("hash", __be32, struct xo_peer, xo_peers, XO_MAX_PEERS);
/* VNIs in use on this node: VXLAN with any other VNI is dropped. */
XO_MAP("hash", __u32, struct xo_vni, xo_vnis, 4096);
/* Traffic per peer node, by the slot in its xo_peers entry. */
XO_MAP("percpu_array", __u32, struct xo_traffic, xo_peer_stats, XO_MAX_PEERS);
/* Traffic per local endpoint, by the slot in its entries. */
XO_MAP("percpu_array", __u32, struct xo_traffic, xo_endpoint_stats, XO_MAX_LOCAL_ENDPOINTS);
/* Drops per reason (enum xo_drop_reason). */
XO_MAP("percpu_array", __u32, struct xo_drop_count, xo_drops, XO_DROP_MAX);

/* Services by (VNI, VIP, port, protocol). */
XO_MAP("hash", struct xo_lb_service_key, struct xo_lb_service, xo_lb_services, 65536);
/* Backends by (service id, index). */
XO_MAP("hash", struct xo_lb_backend_key, struct xo_lb_backend, xo_lb_backends, XO_LB_MAX_BACKENDS);
/* The shape of a Maglev table, for the verifier: u32 slot -> u32 backend index. Slot 0
 * holds M, slots 1..M the table; each service's table is its own map (created by the
 * agent, of its own size: BPF_F_INNER_MAP lets them differ) so that a new table replaces
 * the old one, M and all, in one update of xo_lb_maglev. */
XO_MAP_F("array", __u32, __u32, xo_lb_maglev_inner, 1, BPF_F_INNER_MAP);
/* Maglev tables by service id. */
BPF_TABLE_PINNED("array_of_maps$xo_lb_maglev_inner", __u32, int, xo_lb_maglev, XO_LB_MAX_SERVICES,
                 XO_PIN_DIR "/xo_lb_maglev");
/* Published ports of services, on every node's underlay IP. */
XO_MAP("hash", struct xo_mesh_key, struct xo_mesh, xo_lb_mesh, 65536);
/* Connections to services (both directions), least recently used evicted first. */
XO_MAP("lru_hash", struct xo_ct_key, struct xo_ct, xo_lb_ct, 131072);
/* Counters per service, by id. */
XO_MAP("percpu_array", __u32, struct xo_lb_stats, xo_lb_service_stats, XO_LB_MAX_SERVICES);
/* Counters per backend, by the slot in its entry. */
XO_MAP("percpu_array", __u32, struct xo_lb_stats, xo_lb_backend_stats, XO_LB_MAX_BACKENDS);

/* Is a monitor listening, and for what: one entry. */
XO_MAP("array", __u32, struct xo_monitor, xo_monitor, 1);
/* Events for the monitor: struct xo_event records, written only while it listens.
 * BCC's BPF_RINGBUF_OUTPUT cannot pin: the same table, in a pinned section. */
struct xo_events_table_t {
    int key;
    __u32 leaf;
    int (*ringbuf_output)(void *, __u64, __u64);
    void *(*ringbuf_reserve)(__u64);
    void (*ringbuf_discard)(void *, __u64);
    void (*ringbuf_submit)(void *, __u64);
    __u32 max_entries;
};
__attribute__((section("maps/ringbuf:" XO_PIN_DIR "/xo_events")))
struct xo_events_table_t xo_events = { .max_entries = XO_EVENTS_BYTES };

#endif
