/* Address and port rewriting with incremental checksum updates.
 *
 * Only fields that change are touched. A UDP checksum of zero means "none" and stays zero.
 * XDP cannot see whether the stack left a partial (offloaded) L4 checksum; RFC 1624 is
 * right for full ones, and partial ones are never verified on the veth paths used here.
 */
#ifndef SVB_NAT_H
#define SVB_NAT_H

#include "common.h"
#include "csum.h"
#include "maps.h"

SVB_INLINE void l4_csum_update(__sum16 *check, const struct ipv4_tuple *from,
			       const struct ct4_entry *to, int ports)
{
	if (from->saddr != to->saddr)
		csum_replace4(check, from->saddr, to->saddr);
	if (from->daddr != to->daddr)
		csum_replace4(check, from->daddr, to->daddr);
	if (!ports)
		return;
	if (from->sport != to->sport)
		csum_replace2(check, from->sport, to->sport);
	if (from->dport != to->dport)
		csum_replace2(check, from->dport, to->dport);
}

/* Rewrite the packet's tuple to the entry's (every fragment: addresses; first: ports). */
SVB_INLINE int nat4_rewrite(struct packet *pkt, void *data_end, const struct ct4_entry *to)
{
	struct iphdr *ip = pkt->ip;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (pkt->l4 && pkt->tuple.proto == IPPROTO_TCP) {
		struct tcphdr *th = pkt->l4;

		if ((void *)(th + 1) > data_end)
			return -1;
		l4_csum_update(&th->check, &pkt->tuple, to, 1);
		th->source = to->sport;
		th->dest = to->dport;
	} else if (pkt->l4 && pkt->tuple.proto == IPPROTO_UDP) {
		struct udphdr *uh = pkt->l4;

		if ((void *)(uh + 1) > data_end)
			return -1;
		if (uh->check) {
			l4_csum_update(&uh->check, &pkt->tuple, to, 1);
			if (!uh->check)
				uh->check = 0xffff;
		}
		uh->source = to->sport;
		uh->dest = to->dport;
	}
	if (ip->saddr != to->saddr) {
		csum_replace4(&ip->check, ip->saddr, to->saddr);
		ip->saddr = to->saddr;
	}
	if (ip->daddr != to->daddr) {
		csum_replace4(&ip->check, ip->daddr, to->daddr);
		ip->daddr = to->daddr;
	}
	return 0;
}

/* An ICMP error (unreachable, time exceeded) that a backend sent about a translated flow:
 * the client must see it about the packet it sent, from the Service. */
SVB_INLINE int nat4_icmp_error(struct iphdr *ip, void *data_end)
{
	struct icmphdr *icmp = (void *)(ip + 1);
	struct iphdr *inner = (void *)(icmp + 1);
	struct udphdr *ports = (void *)(inner + 1);  /* TCP and UDP ports sit alike */
	struct ct4_key key;
	struct ct4_entry *e;
	__be32 old;

	if ((void *)(ports + 1) > data_end)
		return 0;
	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
		return 0;
	if (inner->ihl != 5 || (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP))
		return 0;
	/* the quoted packet went client -> backend: its reply entry names the flow */
	ct4_key_of(&key, inner->daddr, inner->saddr, ports->dest, ports->source, inner->protocol,
		   CT_REPLY);
	e = ct4.lookup(&key);
	if (!e)
		return 0;
	if (inner->protocol == IPPROTO_UDP && ports->check) {
		__sum16 before = ports->check;
		struct ipv4_tuple quoted = {
			.saddr = inner->saddr, .daddr = inner->daddr,
			.sport = ports->source, .dport = ports->dest,
		};
		struct ct4_entry back = {
			.saddr = e->daddr, .daddr = e->saddr, .sport = e->dport, .dport = e->sport,
		};

		l4_csum_update(&ports->check, &quoted, &back, 1);
		if (!ports->check)
			ports->check = 0xffff;
		csum_replace2(&icmp->checksum, before, ports->check);
	}
	csum_replace2(&icmp->checksum, ports->source, e->dport);
	ports->source = e->dport;
	csum_replace2(&icmp->checksum, ports->dest, e->sport);
	ports->dest = e->sport;
	old = inner->check;
	csum_replace4(&inner->check, inner->saddr, e->daddr);
	csum_replace4(&inner->check, inner->daddr, e->saddr);
	csum_replace2(&icmp->checksum, old, inner->check);
	csum_replace4(&icmp->checksum, inner->saddr, e->daddr);
	inner->saddr = e->daddr;
	csum_replace4(&icmp->checksum, inner->daddr, e->saddr);
	if (ip->saddr == inner->daddr) {
		csum_replace4(&ip->check, ip->saddr, e->saddr);
		ip->saddr = e->saddr;
	}
	inner->daddr = e->saddr;
	csum_replace4(&ip->check, ip->daddr, e->daddr);
	ip->daddr = e->daddr;
	return 1;
}

#endif
