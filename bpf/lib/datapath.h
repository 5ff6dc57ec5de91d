/* The per-packet service path shared by the pod-veth and uplink XDP programs.
 *
 *   1. replies of translated flows (REPLY entry) get the Service back as their source;
 *   2. packets to a frontend (ClusterIP, NodePort on a node IP, externalIP, load-balancer
 *      IP; a load-balancer IP with source ranges only for sources inside them) stay on their
 *      flow's backend (ORIGINAL entry) or pick one, with SNAT where replies would
 *      otherwise bypass this node: hairpin (a pod reaching itself) and NodePort traffic
 *      from the uplink to an endpoint on another node;
 *   3. frontends without endpoints answer with RST / ICMP, or drop when endpoints exist
 *      elsewhere but the traffic policy excludes them (as kube-proxy does).
 * Everything else passes untouched. The stack then routes the rewritten packet.
 */
#ifndef SVB_DATAPATH_H
#define SVB_DATAPATH_H

#include "common.h"
#include "maps.h"
#include "csum.h"
#include "lb.h"
#include "conntrack.h"
#include "nat.h"
#include "reject.h"
#include "drop.h"

/* Parse Ethernet/IPv4 and the L4 ports; recover them for non-first fragments.
 * Returns 0 for a packet the service path handles, -1 to pass it untouched. */
SVB_INLINE int parse_packet(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct frag4_key fkey = {};
	struct frag4_ports *fports;
	__u16 frag_off;

	if ((void *)(ip + 1) > data_end || eth->h_proto != SVB_HTONS(ETH_P_IP))
		return -1;
	if (ip->version != 4 || ip->ihl != 5)
		return -1;
	pkt->ip = ip;
	pkt->l4 = NULL;
	__builtin_memset(&pkt->tuple, 0, sizeof(pkt->tuple));
	pkt->tuple.saddr = ip->saddr;
	pkt->tuple.daddr = ip->daddr;
	pkt->tuple.proto = ip->protocol;
	frag_off = SVB_NTOHS(ip->frag_off);
	pkt->fragment = (frag_off & (SVB_IP_MF | SVB_IP_OFFSET)) != 0;
	pkt->first = (frag_off & SVB_IP_OFFSET) == 0;
	pkt->ip_id = ip->id;
	if (ip->protocol == IPPROTO_ICMP)
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	fkey.saddr = ip->saddr;
	fkey.daddr = ip->daddr;
	fkey.id = ip->id;
	fkey.proto = ip->protocol;
	if (pkt->first) {
		struct udphdr *ports = (void *)(ip + 1);  /* TCP and UDP ports sit alike */

		if (ip->protocol == IPPROTO_TCP) {
			if ((void *)ip + sizeof(*ip) + sizeof(struct tcphdr) > data_end)
				return -1;
		} else if ((void *)(ports + 1) > data_end) {
			return -1;
		}
		pkt->l4 = ports;
		pkt->tuple.sport = ports->source;
		pkt->tuple.dport = ports->dest;
		if (pkt->fragment) {
			struct frag4_ports seen = { .sport = ports->source, .dport = ports->dest };

			frag4.update(&fkey, &seen);
		}
		return 0;
	}
	fports = frag4.lookup(&fkey);
	if (!fports)
		return -1;
	pkt->tuple.sport = fports->sport;
	pkt->tuple.dport = fports->dport;
	return 0;
}

SVB_INLINE int in_cidr(__be32 addr, __be32 net, __be32 mask)
{
	return (addr & mask) == net;
}

/* The TCP flags byte (FIN SYN RST PSH ACK URG), 0 for anything else. */
SVB_INLINE __u8 tcp_flags(struct packet *pkt, void *data_end)
{
	__u8 *th = pkt->l4;

	if (!th || pkt->tuple.proto != IPPROTO_TCP || (void *)th + sizeof(struct tcphdr) > data_end)
		return 0;
	return th[13];
}

SVB_INLINE int service_path(struct xdp_md *ctx, int from)
{
	struct packet pkt;
	struct node_config *cfg;
	struct lb4_key key;
	struct lb4_service *svc;
	const struct lb4_backend *be;
	struct ct4_entry *e;
	struct ipv4_tuple xlat;
	void *data_end;
	__u16 slot = 0, flags = 0;
	__u32 svc_id = 0;
	__u64 now;
	int internal, syn;
	__u8 tcp, reason;

	if (parse_packet(ctx, &pkt) < 0)
		return XDP_PASS;
	data_end = (void *)(long)ctx->data_end;
	if (pkt.tuple.proto == IPPROTO_ICMP) {
		if (pkt.first && !pkt.fragment)
			nat4_icmp_error(pkt.ip, data_end);
		return XDP_PASS;
	}
	cfg = node_config_get();
	if (!cfg)
		return XDP_PASS;
	now = bpf_ktime_get_ns();
	tcp = tcp_flags(&pkt, data_end);
	syn = (tcp & (TCP_SYN | TCP_ACK)) == TCP_SYN;

	/* 1. a reply of a translated flow */
	e = ct4_lookup(&pkt.tuple, CT_REPLY);
	if (e && !ct4_stale(e, pkt.tuple.proto, now)) {
		struct ipv4_tuple seen = pkt.tuple;

		ct4_touch(e, now);
		if (nat4_rewrite(&pkt, data_end, e) < 0) {
			svc_id = e->svc_id;
			reason = DROP_NAT_FAILED;
			goto drop;
		}
		ct4_tcp_state(&seen, CT_REPLY, e, tcp);
		return XDP_PASS;
	}

	/* 2. a frontend? Pods, and other nodes' pods, see in-cluster endpoints. */
	internal = from == FROM_POD ||
		   in_cidr(pkt.tuple.saddr, cfg->cluster_cidr, cfg->cluster_mask);
	svc = lb4_lookup_service(&key, pkt.tuple.daddr, pkt.tuple.dport, pkt.tuple.proto,
				 internal);
	if (!svc) {
		if (syn || pkt.tuple.proto == IPPROTO_UDP)
			ct4_forget_inverse(&pkt.tuple);
		return XDP_PASS;
	}
	svc_id = svc->svc_id;
	e = ct4_lookup(&pkt.tuple, CT_ORIGINAL);
	if (e && e->svc_id == svc->svc_id && !ct4_stale(e, pkt.tuple.proto, now)) {
		be = lb4_member(&key, svc, e->daddr, e->dport, e->slot);
		/* A TCP connection keeps its endpoint after the endpoint leaves the Service, as
		 * netfilter's conntrack keeps it for kube-proxy: sending its next segment to another
		 * endpoint would be answered with a reset. A SYN, or UDP, chooses again. */
		if ((be || (pkt.tuple.proto == IPPROTO_TCP && !syn)) &&
		    !(syn && now - e->created_ns > CT_SYN_REUSE_NS)) {
			struct ipv4_tuple seen = pkt.tuple;

			ct4_touch(e, now);
			if (nat4_rewrite(&pkt, data_end, e) < 0) {
				reason = DROP_NAT_FAILED;
				goto drop;
			}
			ct4_tcp_state(&seen, CT_ORIGINAL, e, tcp);
			return XDP_PASS;
		}
	}
	if (!pkt.first) {
		reason = DROP_FRAGMENT_NO_FLOW;  /* a fragment whose flow has no backend any more */
		goto drop;
	}

	/* 3. a new flow; a load-balancer IP first checks its source ranges (kube-proxy's
	 * firewall: other sources are dropped, whether endpoints exist or not) */
	if (!lb4_source_allowed(svc, pkt.tuple.saddr)) {
		reason = DROP_SOURCE_RANGE_DENIED;
		goto drop;
	}
	if (!svc->count) {
		reason = svc->flags & SVC_F_DROP_EMPTY ? DROP_NO_LOCAL_ENDPOINT : DROP_NO_ENDPOINT;
		goto drop;
	}
	be = lb4_select(&key, svc, pkt.tuple.saddr, now, &slot);
	if (!be) {
		reason = DROP_NO_BACKEND;
		goto drop;
	}
	xlat = pkt.tuple;
	xlat.daddr = be->address;
	xlat.dport = be->port;
	if ((from == FROM_POD && be->address == pkt.tuple.saddr) || be->address == cfg->node_ip) {
		/* hairpin: the backend would answer itself directly, bypassing the reverse NAT;
		 * and an endpoint at this node's own address (a hostNetwork pod) answers from this
		 * node's stack, which no XDP hook sees, unless the reply is routed to the link
		 * address: the host path routes it into the XDP-attached pair (HOST_LINK). */
		xlat.saddr = cfg->hairpin_ip;
		xlat.sport = ct4_snat_port(xlat.saddr, be->address, be->port, xlat.proto,
					   pkt.tuple.sport, cfg->snat_port_min, cfg->snat_port_max, now);
		flags = CT_F_HAIRPIN | CT_F_SNAT;
	} else if (from == FROM_UPLINK && !(be->flags & BE_F_LOCAL)) {
		/* the remote endpoint must answer through this node, which holds the flow */
		xlat.saddr = cfg->node_ip;
		xlat.sport = ct4_snat_port(xlat.saddr, be->address, be->port, xlat.proto, 0,
					   cfg->snat_port_min, cfg->snat_port_max, now);
		flags = CT_F_SNAT;
	} else if (ct4_reply_taken(&xlat, &pkt.tuple, now)) {
		/* a NAT clash: as netfilter does, the client gets another source port */
		xlat.sport = ct4_snat_port(xlat.saddr, be->address, be->port, xlat.proto, 0,
					   cfg->snat_port_min, cfg->snat_port_max, now);
		flags = CT_F_SNAT;
	}
	if (!xlat.sport) {
		reason = DROP_SNAT_PORTS_EXHAUSTED;
		goto drop;
	}
	if (ct4_create(&pkt.tuple, &xlat, svc->svc_id, flags, slot, now) < 0) {
		reason = DROP_CT_FULL;
		goto drop;
	}
	{
		struct ct4_entry to = {
			.saddr = xlat.saddr, .daddr = xlat.daddr,
			.sport = xlat.sport, .dport = xlat.dport,
		};

		if (nat4_rewrite(&pkt, data_end, &to) < 0) {
			reason = DROP_NAT_FAILED;
			goto drop;
		}
	}
	return XDP_PASS;

drop:
	/* the one place a drop is reported (bpf/lib/drop.h); a Service without endpoints
	 * answers the packet instead of dropping it, and is reported alike */
	xdp_drop_report(ctx, &pkt.tuple, reason, from, tcp, svc_id);
	if (reason != DROP_NO_ENDPOINT)
		return XDP_DROP;
	if (pkt.tuple.proto == IPPROTO_TCP)
		return reject_tcp(ctx);
	return reject_udp(ctx);
}

#endif
