/* XDP on the node's uplink: NodePort and externalIP traffic, and replies from endpoints
 * on other nodes. */
#include "lib/datapath.h"

int svb_xdp_host(struct xdp_md *ctx)
{
	return service_path(ctx, FROM_UPLINK);
}
