/* XDP on the node side of every pod veth: what a pod sends enters the node here. */
#include "lib/datapath.h"

int svb_xdp_lxc(struct xdp_md *ctx)
{
	return service_path(ctx, FROM_POD);
}
