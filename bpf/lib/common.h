/* Constants and small helpers shared by every xoverlay program. */
#ifndef XO_COMMON_H
#define XO_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

/* Every host-side endpoint veth carries this MAC, and the data path answers a container's
 * ARP for any other address with it (lib/arp.h), so it never has to know which veth a MAC
 * belongs to. xoverlay's own plumbing gives each container a permanent neighbour entry
 * for its gateway (XO_GW_IP) with it, as Calico does, and that container never ARPs.
 * ee:... is locally administered unicast. */
#define XO_GW_MAC {0xee, 0xee, 0xee, 0xee, 0xee, 0xee}

/* The gateway address every container routes through (xoverlay.core.model.GATEWAY_IP,
 * 169.254.1.1; tests/test_dns.py checks the two agree). Only DNS may be addressed to it:
 * the node's responder listens there (docs/DNS.md). Host byte order. */
#define XO_GW_IP 0xa9fe0101
#define XO_DNS_PORT 53

#define XO_VXLAN_HLEN 8
/* Outer IPv4 + UDP + VXLAN + inner Ethernet: what encap adds after the outer
 * Ethernet header, and what decap removes. We never send IP options. */
#define XO_ENCAP_LEN (sizeof(struct iphdr) + sizeof(struct udphdr) + XO_VXLAN_HLEN + ETH_HLEN)

#define XO_IP_DF 0x4000
#define XO_IP_MF 0x2000
#define XO_IP_OFFSET 0x1fff

/* Source ports for VXLAN, from the flow hash (RFC 7348 5: entropy for ECMP).
 * The kernel vxlan device uses the local port range; so do we. */
#define XO_SPORT_MIN 32768
#define XO_SPORT_MAX 61000

#ifndef XO_PIN_DIR
#error "XO_PIN_DIR must be set by the loader (a per-node directory on bpffs)"
#endif

static __always_inline int xo_mac_equal(const __u8 *a, const __u8 *b)
{
    return ((const __u16 *)a)[0] == ((const __u16 *)b)[0] &&
           ((const __u16 *)a)[1] == ((const __u16 *)b)[1] &&
           ((const __u16 *)a)[2] == ((const __u16 *)b)[2];
}

static __always_inline void xo_mac_copy(__u8 *dst, const __u8 *src)
{
    __builtin_memcpy(dst, src, ETH_ALEN);
}

/* BCC 0.26 declares bpf_redirect_neigh with 3 arguments; the kernel takes 4. */
#define xo_redirect_neigh(ifindex, params, plen, flags)                                  \
    ((long (*)(__u32, struct bpf_redir_neigh *, int, __u64))BPF_FUNC_redirect_neigh)(    \
        ifindex, params, plen, flags)

#endif
