/* Connection tracking for translated flows: one LRU entry per direction.
 *
 * The ORIGINAL entry (client tuple -> backend tuple) keeps a flow on its backend; the
 * REPLY entry (backend tuple -> Service tuple) lets the client see only the Service.
 * LRU eviction bounds the table. A RST removes both entries at once; after a FIN, and
 * for UDP, an entry idle for long is stale: its tuple may be reused by a new flow, which
 * must not have its replies rewritten (a direct connection reusing a closed flow's ports).
 */
#ifndef SVB_CONNTRACK_H
#define SVB_CONNTRACK_H

#include "common.h"
#include "maps.h"

/* A TCP SYN on an entry older than this opens a new connection (the port was reused). */
#define CT_SYN_REUSE_NS (1ULL * SVB_NSEC_PER_SEC)
/* An SNAT port whose reply entry was idle this long may be taken again. */
#define CT_SNAT_IDLE_NS (120ULL * SVB_NSEC_PER_SEC)
/* `seen_ns` is written at most this often, so established flows mostly only read. */
#define CT_SEEN_EVERY_NS (1ULL * SVB_NSEC_PER_SEC)
#define CT_SNAT_TRIES 8
#define CT_CLOSING_IDLE_NS (10ULL * SVB_NSEC_PER_SEC)
#define CT_UDP_IDLE_NS (30ULL * SVB_NSEC_PER_SEC)  /* nf_conntrack_udp_timeout */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

SVB_INLINE void ct4_key_of(struct ct4_key *key, __be32 saddr, __be32 daddr, __be16 sport,
			   __be16 dport, __u8 proto, __u8 dir)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = saddr;
	key->daddr = daddr;
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->dir = dir;
}

SVB_INLINE struct ct4_entry *ct4_lookup(const struct ipv4_tuple *t, __u8 dir)
{
	struct ct4_key key;

	ct4_key_of(&key, t->saddr, t->daddr, t->sport, t->dport, t->proto, dir);
	return ct4.lookup(&key);
}

SVB_INLINE void ct4_touch(struct ct4_entry *e, __u64 now)
{
	if (now - e->seen_ns > CT_SEEN_EVERY_NS)
		e->seen_ns = now;
}

SVB_INLINE int ct4_stale(const struct ct4_entry *e, __u8 proto, __u64 now)
{
	if (e->flags & CT_F_CLOSING)
		return now - e->seen_ns > CT_CLOSING_IDLE_NS;
	if (proto == IPPROTO_UDP)
		return now - e->seen_ns > CT_UDP_IDLE_NS;
	return 0;
}

/* The other direction's key of a flow: an entry's rewrite target, reversed. */
SVB_INLINE void ct4_peer_key(struct ct4_key *key, const struct ct4_entry *e, __u8 proto,
			     __u8 dir)
{
	ct4_key_of(key, e->daddr, e->saddr, e->dport, e->sport, proto,
		   dir == CT_ORIGINAL ? CT_REPLY : CT_ORIGINAL);
}

/* A TCP segment of a tracked flow went by: RST ends the flow, FIN starts its end. */
SVB_INLINE void ct4_tcp_state(const struct ipv4_tuple *t, __u8 dir, struct ct4_entry *e,
			      __u8 tcp_flags)
{
	struct ct4_key own, peer;
	struct ct4_entry *other;

	if (!(tcp_flags & (TCP_RST | TCP_FIN)))
		return;
	ct4_key_of(&own, t->saddr, t->daddr, t->sport, t->dport, t->proto, dir);
	ct4_peer_key(&peer, e, t->proto, dir);
	if (tcp_flags & TCP_RST) {
		ct4.delete(&own);
		ct4.delete(&peer);
		return;
	}
	e->flags |= CT_F_CLOSING;
	other = ct4.lookup(&peer);
	if (other)
		other->flags |= CT_F_CLOSING;
}

/* Traffic straight to an endpoint with the tuple of an old translated flow (a TCP
 * connection opening, or any UDP datagram: an earlier flow from the same client port may
 * have been translated here to this endpoint, and the client's translation now happens on
 * another node): that flow's reply entry would rewrite these replies, so the flow goes,
 * both entries (an original entry left alone would translate the old flow's next packet
 * with no reply entry to bring the answer back; without it, that packet starts afresh). */
SVB_INLINE void ct4_forget_inverse(const struct ipv4_tuple *t)
{
	struct ct4_key key, orig;
	struct ct4_entry *e;

	ct4_key_of(&key, t->daddr, t->saddr, t->dport, t->sport, t->proto, CT_REPLY);
	e = ct4.lookup(&key);  /* the lockless lookup first: the entry is rarely there */
	if (!e)
		return;
	ct4_key_of(&orig, e->daddr, e->saddr, e->dport, e->sport, t->proto, CT_ORIGINAL);
	ct4.delete(&orig);
	ct4.delete(&key);
}

/* A port for (saddr -> backend) that no live flow uses: `preferred` first, then random ones. */
SVB_INLINE __be16 ct4_snat_port(__be32 snat_addr, __be32 be_addr, __be16 be_port, __u8 proto,
				__be16 preferred, __u16 lo, __u16 hi, __u64 now)
{
	struct ct4_key key;
	struct ct4_entry *used;
	__u16 span = hi - lo + 1;
	__be16 port = preferred;

#pragma unroll
	for (int i = 0; i < CT_SNAT_TRIES; i++) {
		if (i || !port)
			port = SVB_HTONS(lo + (__u16)(bpf_get_prandom_u32() % span));
		ct4_key_of(&key, be_addr, snat_addr, be_port, port, proto, CT_REPLY);
		used = ct4.lookup(&key);
		if (!used || now - used->seen_ns > CT_SNAT_IDLE_NS)
			return port;
	}
	return 0;
}

/* Whether the reply key of a new flow (`xlat` reversed) belongs to another live flow: the
 * same client port reaching the same backend through another frontend (a UDP socket sending
 * to two Services, or an entry left by a flow the client abandoned). Its replies would be
 * rewritten to the wrong frontend, or this flow's to its. */
SVB_INLINE int ct4_reply_taken(const struct ipv4_tuple *xlat, const struct ipv4_tuple *orig,
			       __u64 now)
{
	struct ct4_key key;
	struct ct4_entry *other;

	ct4_key_of(&key, xlat->daddr, xlat->saddr, xlat->dport, xlat->sport, xlat->proto, CT_REPLY);
	other = ct4.lookup(&key);
	return other && !ct4_stale(other, xlat->proto, now) &&
	       (other->saddr != orig->daddr || other->sport != orig->dport);
}

/* Record both directions of a new flow: `orig` as the client sent it, `xlat` as rewritten. */
SVB_INLINE int ct4_create(const struct ipv4_tuple *orig, const struct ipv4_tuple *xlat,
			  __u32 svc_id, __u16 flags, __u16 slot, __u64 now)
{
	struct ct4_key key;
	struct ct4_entry e = {};

	e.saddr = xlat->saddr;
	e.daddr = xlat->daddr;
	e.sport = xlat->sport;
	e.dport = xlat->dport;
	e.svc_id = svc_id;
	e.flags = flags;
	e.slot = slot;
	e.created_ns = now;
	e.seen_ns = now;
	ct4_key_of(&key, orig->saddr, orig->daddr, orig->sport, orig->dport, orig->proto,
		   CT_ORIGINAL);
	if (ct4.update(&key, &e))
		return -1;
	e.saddr = orig->daddr;
	e.daddr = orig->saddr;
	e.sport = orig->dport;
	e.dport = orig->sport;
	ct4_key_of(&key, xlat->daddr, xlat->saddr, xlat->dport, xlat->sport, orig->proto,
		   CT_REPLY);
	return ct4.update(&key, &e);
}

#endif
