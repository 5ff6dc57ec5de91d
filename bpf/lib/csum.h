/* Internet checksums: incremental updates (RFC 1624) and full sums over small headers.
 *
 * One's complement sums do not depend on byte order as long as every word is read the
 * same way, so network-order fields are summed as loaded.
 */
#ifndef SVB_CSUM_H
#define SVB_CSUM_H

#include "common.h"

SVB_INLINE __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* HC' = ~(~HC + ~m + m') for one 32-bit field changing from `from` to `to`. */
SVB_INLINE void csum_replace4(__sum16 *check, __be32 from, __be32 to)
{
	__u32 sum = (__u16)~*check;
	sum += (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	*check = (__sum16)~sum;
}

SVB_INLINE void csum_replace2(__sum16 *check, __be16 from, __be16 to)
{
	__u32 sum = (__u16)~*check;
	sum += (__u16)~from + (__u16)to;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	*check = (__sum16)~sum;
}

/* The IPv4 header checksum of a 20-byte header whose check field is zero. */
SVB_INLINE __u16 ipv4_csum(struct iphdr *ip)
{
	__u16 *word = (__u16 *)ip;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += word[i];
	return csum_fold(sum);
}

/* Sum of the IPv4 pseudo header, to be folded with the L4 header sum. */
SVB_INLINE __u64 pseudo_sum(__be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
	return (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) + (daddr >> 16) +
	       SVB_HTONS(proto) + SVB_HTONS(len);
}

#endif
