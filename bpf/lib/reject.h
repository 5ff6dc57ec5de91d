/* Answers for Services without endpoints: a TCP RST or an ICMP port unreachable.
 *
 * The answer is built in place and handed to the node's stack (XDP_PASS) with the
 * Ethernet header as received: the node forwards it back to the client like any routed
 * packet, which works on veth without XDP on the client's side (XDP_TX would need it).
 */
#ifndef SVB_REJECT_H
#define SVB_REJECT_H

#include "common.h"
#include "csum.h"

#define RST_FRAME_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr))
#define ICMP_QUOTE_LEN (sizeof(struct iphdr) + 8)
#define ICMP_FRAME_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct icmphdr) + \
			ICMP_QUOTE_LEN)

SVB_INLINE void ipv4_answer_header(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto,
				   __u16 tot_len)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = SVB_HTONS(tot_len);
	ip->id = 0;
	ip->frag_off = SVB_HTONS(SVB_IP_DF);
	ip->ttl = SVB_TTL;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = 0;
	ip->check = ipv4_csum(ip);
}

/* Turn a TCP segment into the RST that answers it (RFC 9293 3.10.7.1). */
SVB_INLINE int reject_tcp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *th = (void *)(ip + 1);
	__be32 saddr, daddr, seq, ack_in;
	__be16 sport, dport;
	__u32 seg_len;
	__u16 flags;
	__u64 sum;

	if ((void *)(th + 1) > data_end || ip->ihl != 5 || th->rst)
		return XDP_DROP;
	saddr = ip->saddr;
	daddr = ip->daddr;
	sport = th->source;
	dport = th->dest;
	seq = th->seq;
	ack_in = th->ack_seq;
	seg_len = SVB_NTOHS(ip->tot_len);
	if (seg_len < sizeof(*ip) + th->doff * 4)
		return XDP_DROP;
	seg_len -= sizeof(*ip) + th->doff * 4;
	seg_len += th->syn + th->fin;
	flags = th->ack;

	if (bpf_xdp_adjust_tail(ctx, (int)RST_FRAME_LEN - (int)(data_end - data)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	th = (void *)(ip + 1);
	if ((void *)(th + 1) > data_end)
		return XDP_DROP;

	ipv4_answer_header(ip, daddr, saddr, IPPROTO_TCP, sizeof(*ip) + sizeof(*th));
	__builtin_memset(th, 0, sizeof(*th));
	th->source = dport;
	th->dest = sport;
	th->doff = 5;
	th->rst = 1;
	if (flags) {
		th->seq = ack_in;
	} else {
		th->ack = 1;
		th->ack_seq = SVB_HTONL(SVB_NTOHL(seq) + seg_len);
	}
	sum = pseudo_sum(daddr, saddr, IPPROTO_TCP, sizeof(*th));
	{
		__u16 *word = (__u16 *)th;
#pragma unroll
		for (int i = 0; i < 10; i++)
			sum += word[i];
	}
	th->check = csum_fold(sum);
	return XDP_PASS;
}

/* Turn a UDP datagram into ICMP port unreachable quoting its IP header and 8 bytes. */
SVB_INLINE int reject_udp(struct xdp_md *ctx)
{
	const int grow = sizeof(struct iphdr) + sizeof(struct icmphdr);
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip, *inner;
	struct icmphdr *icmp;
	__u64 sum = 0;

	if (bpf_xdp_adjust_head(ctx, -grow))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + ICMP_FRAME_LEN > data_end)
		return XDP_DROP;
	/* the received Ethernet header moves to the new front, unchanged */
	__builtin_memcpy(data, data + grow, sizeof(struct ethhdr));
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);
	inner = (void *)(icmp + 1);
	if ((void *)inner + ICMP_QUOTE_LEN > data_end || inner->ihl != 5)
		return XDP_DROP;
	ipv4_answer_header(ip, inner->daddr, inner->saddr, IPPROTO_ICMP,
			   ICMP_FRAME_LEN - sizeof(struct ethhdr));
	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_PORT_UNREACH;
	icmp->checksum = 0;
	icmp->un.gateway = 0;
	{
		__u16 *word = (__u16 *)icmp;
#pragma unroll
		for (int i = 0; i < (sizeof(struct icmphdr) + ICMP_QUOTE_LEN) / 2; i++)
			sum += word[i];
	}
	icmp->checksum = csum_fold(sum);
	if (bpf_xdp_adjust_tail(ctx, (int)ICMP_FRAME_LEN - (int)(data_end - data)))
		return XDP_DROP;
	return XDP_PASS;
}

#endif
