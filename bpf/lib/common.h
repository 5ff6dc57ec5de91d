/* Byte order, packet parsing and constants shared by every svcbench BPF program. */
#ifndef SVB_COMMON_H
#define SVB_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#define SVB_INLINE static __always_inline

/* Constant-folding byte swaps (x86 and arm64 are little endian; bcc runs on the host). */
#define SVB_HTONS(x) ((__be16)__builtin_bswap16((__u16)(x)))
#define SVB_NTOHS(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define SVB_HTONL(x) ((__be32)__builtin_bswap32((__u32)(x)))
#define SVB_NTOHL(x) ((__u32)__builtin_bswap32((__u32)(x)))

#define SVB_IP_MF 0x2000
#define SVB_IP_DF 0x4000
#define SVB_IP_OFFSET 0x1fff
#define SVB_TTL 64
#define SVB_ECONNREFUSED 111
#define SVB_NSEC_PER_SEC 1000000000ULL

/* Where a packet entered the node: a pod's veth, or the uplink to the other nodes. */
#define FROM_POD 0
#define FROM_UPLINK 1

/* The 5-tuple a packet carries; ports stay zero for non-first fragments until recovered. */
struct ipv4_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* A parsed IPv4 packet in an XDP buffer; l4 is NULL for a fragment without the L4 header. */
struct packet {
	struct iphdr *ip;
	void *l4;
	struct ipv4_tuple tuple;
	__u8 fragment;  /* part of a fragmented datagram */
	__u8 first;     /* carries the L4 header (offset 0) */
	__be16 ip_id;
};

#endif
