/* XDP on the underlay device: drop bad tunnel traffic before the kernel allocates
 * anything for it, and the routing mesh's forward path (lib/mesh.h): a packet to this
 * node's IP on a published port whose backend is on another node is load-balanced,
 * VXLAN-encapsulated here and sent straight back out (XDP_TX).
 * VXLAN from a non-peer, with a VNI not in use here, or malformed is dropped and
 * counted; everything else passes (the tc program decapsulates).
 * Loaded frags-aware (BPF_F_XDP_HAS_FRAGS) so jumbo frames pass: it reads only the
 * headers, which are in the first buffer. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/monitor.h"
#include "lib/vxlan.h"
#include "lib/mesh.h"

/* A frame of `len` bytes from the underlay. Returns the XDP verdict or -reason. */
static __always_inline int xo_from_underlay_xdp(struct xdp_md *ctx, const struct xo_config *cfg, __u32 len)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct xo_tunnel t = {};
    int ret = xo_classify_underlay(data, data_end, len, cfg, &t, 1);
    if (ret == XO_NOT_VXLAN)
        return xo_mesh_xdp(ctx, cfg, len);
    if (ret < 0)
        return ret;
    return XDP_PASS;
}

int xo_underlay_xdp(struct xdp_md *ctx)
{
    struct xo_config *cfg = xo_get_config();
    if (!cfg)
        return XDP_PASS;
    /* The whole frame, as tc counts skb->len: a multi-buffer (jumbo) frame is longer
     * than its first buffer, data_end - data. */
    __u32 len = bpf_xdp_get_buff_len(ctx);
    int ret = xo_from_underlay_xdp(ctx, cfg, len);
    if (ret >= 0)
        return ret;
    return xo_drop(ctx, XO_HOOK_UNDERLAY_XDP, -ret, len);
}
