/* Cgroup socket hooks: host-network processes reach Services at connect/sendmsg time.
 *
 * No XDP hook sees what a node's own processes send, so their sockets are pointed at a
 * backend before the first packet exists (as Cilium's socket LB does), and the Service
 * address is put back where the process reads peer addresses (recvmsg, getpeername).
 * Cgroups are not per network namespace: every hook first checks that the socket lives
 * in this node's namespace and leaves all other sockets alone.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/drop.h"

#define SYS_PROCEED 1
#define SYS_REJECT 0

SVB_INLINE struct node_config *sock4_node(struct bpf_sock_addr *ctx)
{
	struct node_config *cfg = node_config_get();

	if (!cfg || bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
		return NULL;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return NULL;
	return cfg;
}

SVB_INLINE int sock4_forward(struct bpf_sock_addr *ctx, int from)
{
	struct node_config *cfg = sock4_node(ctx);
	struct lb4_key key;
	struct lb4_service *svc;
	const struct lb4_backend *be;
	struct sock4_key rkey = {};
	struct sock4_val rval = {};
	__be32 address;
	__be16 port;
	__u16 slot = 0;

	if (!cfg)
		return SYS_PROCEED;
	address = ctx->user_ip4;
	port = (__be16)ctx->user_port;
	svc = lb4_lookup_service(&key, address, port, (__u8)ctx->protocol, 1);
	if (!svc)
		return SYS_PROCEED;
	/* Outside the load-balancer IP's source ranges: left untranslated, the packet meets
	 * the XDP host path, which drops it. */
	if (!lb4_source_allowed(svc, cfg->node_ip))
		return SYS_PROCEED;
	if (!svc->count) {
		/* dropping has no socket-level meaning: the packet leaves untranslated */
		if (svc->flags & SVC_F_DROP_EMPTY)
			return SYS_PROCEED;
		{
			/* reported as the XDP path reports its rejects (bpf/lib/drop.h) */
			struct ipv4_tuple t = {
				.daddr = address, .dport = port, .proto = (__u8)ctx->protocol,
			};

			xdp_drop_report_at(0, &t, DROP_NO_ENDPOINT, from, 0, svc->svc_id);
		}
		bpf_set_retval(-SVB_ECONNREFUSED);
		return SYS_REJECT;
	}
	be = lb4_select(&key, svc, cfg->node_ip, bpf_ktime_get_ns(), &slot);
	if (!be)
		return SYS_PROCEED;
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = be->address;
	rkey.port = be->port;
	rval.address = address;
	rval.port = port;
	sock4_revnat.update(&rkey, &rval);
	ctx->user_ip4 = rkey.address;
	ctx->user_port = (__u32)rkey.port;
	return SYS_PROCEED;
}

SVB_INLINE int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct sock4_key rkey = {};
	struct sock4_val *rval;

	if (!sock4_node(ctx))
		return SYS_PROCEED;
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = ctx->user_ip4;
	rkey.port = (__be16)ctx->user_port;
	rval = sock4_revnat.lookup(&rkey);
	if (rval) {
		ctx->user_ip4 = rval->address;
		ctx->user_port = (__u32)rval->port;
	}
	return SYS_PROCEED;
}

int svb_sock4_conn(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx, FROM_SOCK_CONNECT);
}

int svb_sock4_send(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx, FROM_SOCK_SENDMSG);
}

int svb_sock4_recv(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

int svb_sock4_peer(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}
