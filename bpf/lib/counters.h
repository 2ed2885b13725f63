/* What every program counts, and the node's settings it reads first.
 *
 * Counters are per-CPU array entries found by a slot the program already has (from the
 * entry it looked up for the packet): an array lookup the verifier inlines. A NULL
 * counter (a slot out of range, XO_NO_SLOT) counts nothing. */
#ifndef XO_COUNTERS_H
#define XO_COUNTERS_H

#include "common.h"
#include "structs.h"
#include "maps.h"

static __always_inline struct xo_config *xo_get_config(void)
{
    __u32 zero = 0;
    return xo_config.lookup(&zero);
}

static __always_inline void xo_count_tx(struct xo_traffic *t, __u32 bytes)
{
    if (t) {
        t->tx_packets++;
        t->tx_bytes += bytes;
    }
}

static __always_inline void xo_count_rx(struct xo_traffic *t, __u32 bytes)
{
    if (t) {
        t->rx_packets++;
        t->rx_bytes += bytes;
    }
}

/* A peer's, also stamped: when we last heard from it (`peer ls`, LAST RX). Only peers:
 * the clock is a helper call, a tenth of the decap program's time (measured). */
static __always_inline void xo_count_peer_rx(struct xo_traffic *t, __u32 bytes)
{
    if (t) {
        xo_count_rx(t, bytes);
        t->last_rx_ns = bpf_ktime_get_coarse_ns();     /* a tick's resolution is plenty */
    }
}

/* The counters of a local endpoint and of a peer node, by their slot (NULL out of range). */
static __always_inline struct xo_traffic *xo_endpoint_traffic(__u32 slot)
{
    return xo_endpoint_stats.lookup(&slot);
}

static __always_inline struct xo_traffic *xo_peer_traffic(__u32 slot)
{
    return xo_peer_stats.lookup(&slot);
}

/* A drop, by reason (enum xo_drop_reason). */
static __always_inline void xo_count_drop(int reason, __u32 bytes)
{
    __u32 key = reason;
    struct xo_drop_count *count = xo_drops.lookup(&key);
    if (count) {
        count->packets++;
        count->bytes += bytes;
    }
}

/* A client's packet to a service, for the service's or the backend's counters; `fresh`:
 * it opened a connection. */
static __always_inline void xo_lb_count(struct xo_lb_stats *s, __u32 bytes, int fresh)
{
    if (s) {
        s->packets++;
        s->bytes += bytes;
        s->connections += fresh;
    }
}

#endif
