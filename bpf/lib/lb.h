/* Service lookup and backend selection: (address, port, protocol) -> one backend.
 *
 * A new flow picks a backend at random, or the one its client used last when ClientIP
 * affinity is on and fresh. A flow or an affinity entry keeps its backend only while the
 * frontend still lists that address and port: sync removes gone or unready endpoints.
 */
#ifndef SVB_LB_H
#define SVB_LB_H

#include "common.h"
#include "maps.h"

/* The frontend's entry; `key` is left naming the scope that matched. */
SVB_INLINE struct lb4_service *lb4_lookup_service(struct lb4_key *key, __be32 address,
						  __be16 port, __u8 proto, int internal)
{
	struct lb4_service *svc;

	__builtin_memset(key, 0, sizeof(*key));
	key->address = address;
	key->dport = port;
	key->proto = proto;
	if (internal) {
		key->scope = LB_SCOPE_INTERNAL;
		svc = lb4_services.lookup(key);
		if (svc)
			return svc;
	}
	key->scope = LB_SCOPE_ALL;
	return lb4_services.lookup(key);
}

/* Whether a new flow from `source` may use the frontend: always, unless the frontend is a
 * load-balancer IP with loadBalancerSourceRanges and no range holds the source. */
SVB_INLINE int lb4_source_allowed(const struct lb4_service *svc, __be32 source)
{
	struct lb4_range_key key = {};

	if (!(svc->flags & SVC_F_SOURCE_RANGES))
		return 1;
	key.prefixlen = 64;
	key.svc_id = svc->svc_id;
	key.address = source;
	return lb4_source_ranges.lookup(&key) != NULL;
}

/* Backend at 1-based `slot`: inline, or in its own slot entry for large Services. */
SVB_INLINE const struct lb4_backend *lb4_slot(const struct lb4_key *key,
					      const struct lb4_service *svc, __u32 slot)
{
	struct lb4_key k;
	struct lb4_service *overflow;

	if (slot == 0 || slot > svc->count)
		return NULL;
	if (slot <= LB4_INLINE)
		return &svc->backends[(slot - 1) & (LB4_INLINE - 1)];
	k = *key;
	k.slot = slot;
	overflow = lb4_services.lookup(&k);
	if (!overflow)
		return NULL;
	/* keeps clang from offsetting the pointer before the verifier saw the NULL check */
	asm volatile("" : "+r"(overflow));
	return &overflow->backends[0];
}

/* The backend address:port if the frontend still lists it: inline, else at its slot. */
SVB_INLINE const struct lb4_backend *lb4_member(const struct lb4_key *key,
						const struct lb4_service *svc, __be32 address,
						__be16 port, __u16 slot)
{
	const struct lb4_backend *be;

#pragma unroll
	for (int i = 0; i < LB4_INLINE; i++) {
		if (i < svc->count && svc->backends[i].address == address &&
		    svc->backends[i].port == port)
			return &svc->backends[i];
	}
	if (slot <= LB4_INLINE)
		return NULL;
	be = lb4_slot(key, svc, slot);
	return be && be->address == address && be->port == port ? be : NULL;
}

SVB_INLINE const struct lb4_backend *lb4_pick(const struct lb4_key *key,
					      const struct lb4_service *svc, __u16 *slot)
{
	__u16 count = svc->count;

	if (!count)
		return NULL;
	*slot = (bpf_get_prandom_u32() % count) + 1;
	return lb4_slot(key, svc, *slot);
}

/* The backend for a new flow from `client` (a pod IP, or the node IP for host sockets). */
SVB_INLINE const struct lb4_backend *lb4_select(const struct lb4_key *key,
						const struct lb4_service *svc, __be32 client,
						__u64 now, __u16 *slot)
{
	struct affinity_key ak = {};
	struct affinity_val *last, fresh = {};
	const struct lb4_backend *be;

	if (!(svc->flags & SVC_F_AFFINITY))
		return lb4_pick(key, svc, slot);
	ak.client = client;
	ak.svc_id = svc->svc_id;
	last = affinity.lookup(&ak);
	if (last && now - last->seen_ns < (__u64)svc->affinity_timeout_s * SVB_NSEC_PER_SEC) {
		be = lb4_member(key, svc, last->address, last->port, last->slot);
		if (be) {
			/* kube-proxy's `recent --set`: every new connection restarts the timeout */
			last->seen_ns = now;
			*slot = last->slot;
			return be;
		}
	}
	be = lb4_pick(key, svc, slot);
	if (be) {
		fresh.address = be->address;
		fresh.port = be->port;
		fresh.slot = *slot;
		fresh.seen_ns = now;
		affinity.update(&ak, &fresh);
	}
	return be;
}

#endif
