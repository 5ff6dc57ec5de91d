/* Drop notifications: every packet the XDP service path drops (or consumes to answer with
 * a reject) is reported once through the node's ring buffer `xdp_drops`, with a reason of
 * our own, so `svcbench monitor --type drop` can show what kfree_skb never sees (XDP_DROP
 * frees the frame before an sk_buff exists). Only the drop path pays: one 32-byte
 * bpf_ringbuf_output without a wakeup (the reader polls). When nobody reads, the ring fills
 * and later reports are lost, which costs the datapath nothing more.
 *
 * Reasons and the event layout are mirrored in bpf/xdpdrops.py.
 */
#ifndef SVB_DROP_H
#define SVB_DROP_H

#include "common.h"

#define DROP_NAT_FAILED 1          /* the rewrite found the packet shorter than parsed */
#define DROP_FRAGMENT_NO_FLOW 2    /* a non-first fragment whose flow has no backend */
#define DROP_SOURCE_RANGE_DENIED 3 /* outside the load-balancer IP's source ranges */
#define DROP_NO_LOCAL_ENDPOINT 4   /* endpoints exist, none for this traffic (a Local policy) */
#define DROP_NO_ENDPOINT 5         /* no endpoint at all: answered with RST / ICMP instead */
#define DROP_NO_BACKEND 6          /* the frontend's backend slot is missing */
#define DROP_SNAT_PORTS_EXHAUSTED 7
#define DROP_CT_FULL 8             /* the conntrack entry could not be created */

#ifndef XDP_DROPS_PAGES
#define XDP_DROPS_PAGES 4          /* 16 KiB: 512 reports between two polls */
#endif
#define SVB_RB_NO_WAKEUP 1

/* Where a report comes from, beyond FROM_POD and FROM_UPLINK (bpf/lib/common.h): the
 * cgroup socket hooks, which refuse a host process's connect() or sendmsg() to a Service
 * without endpoints (no packet exists yet; the source is unknown there, left 0). */
#define FROM_SOCK_CONNECT 2
#define FROM_SOCK_SENDMSG 3

struct xdp_drop_event {
	__u64 ts_ns;               /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 ifindex;             /* the interface the packet came in on */
	__u8 proto;
	__u8 reason;
	__u8 from;                 /* FROM_POD or FROM_UPLINK */
	__u8 tcp_flags;
	__u32 svc_id;
};

BPF_RINGBUF_OUTPUT(xdp_drops, XDP_DROPS_PAGES);

SVB_INLINE void xdp_drop_report_at(__u32 ifindex, const struct ipv4_tuple *t, __u8 reason,
				   int from, __u8 tcp, __u32 svc_id)
{
	struct xdp_drop_event ev = {
		.ts_ns = bpf_ktime_get_ns(),
		.saddr = t->saddr, .daddr = t->daddr,
		.sport = t->sport, .dport = t->dport,
		.ifindex = ifindex,
		.proto = t->proto, .reason = reason, .from = (__u8)from, .tcp_flags = tcp,
		.svc_id = svc_id,
	};

	xdp_drops.ringbuf_output(&ev, sizeof(ev), SVB_RB_NO_WAKEUP);
}

SVB_INLINE void xdp_drop_report(struct xdp_md *ctx, const struct ipv4_tuple *t, __u8 reason,
				int from, __u8 tcp, __u32 svc_id)
{
	xdp_drop_report_at(ctx->ingress_ifindex, t, reason, from, tcp, svc_id);
}

#endif
