/* tc ingress on the node's loopback device: the node's own connections to its published
 * ports. A socket on the node that connects to the node's IP (or to 127.0.0.1, which the
 * agent's nftables table turns into the node's IP: xoverlay/kernel/gateway.py) sends through
 * lo, never through the underlay where the routing mesh listens; here it takes the mesh's
 * tc path (lib/mesh.h) as an outside client's packet would: Maglev and the connection
 * table, DNAT, then into a local backend or VXLAN to the backend's node. The replies
 * come back into the stack through lo (xo_mesh_reply_out), marked, and pass.
 *
 * Everything else on lo (the node's own local traffic) costs a config lookup and a look
 * at the headers, and passes untouched. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/monitor.h"
#include "lib/parsing.h"
#include "lib/mesh.h"

int xo_loopback_ingress(struct __sk_buff *skb)
{
    if (skb->mark == XO_MARK_MESH_REPLY) {
        skb->mark = 0;
        return TC_ACT_OK;
    }
    struct xo_config *cfg = xo_get_config();
    if (!cfg)
        return TC_ACT_OK;
    __u32 len = skb->len;
    int ret = xo_mesh_tc(skb, cfg);
    if (ret >= 0)
        return ret;
    return xo_drop(skb, XO_HOOK_LOOPBACK, -ret, len);
}
