/* Map layouts (mirrored in bpf/maps.py, which checks the sizes) and the maps themselves.
 *
 * One set of maps per node, shared by every program of that node: XDP on each pod veth,
 * XDP on the uplink, and the cgroup socket hooks.
 */
#ifndef SVB_MAPS_H
#define SVB_MAPS_H

#include "common.h"

#ifndef LB4_SERVICES_MAX
#define LB4_SERVICES_MAX (1 << 19)
#endif
#ifndef CT4_MAX
#define CT4_MAX 65536
#endif
#ifndef AFFINITY_MAX
#define AFFINITY_MAX 16384
#endif
#ifndef FRAG4_MAX
#define FRAG4_MAX 8192
#endif
#ifndef SOCK4_REVNAT_MAX
#define SOCK4_REVNAT_MAX 16384
#endif
#ifndef LB4_SOURCE_RANGES_MAX
#define LB4_SOURCE_RANGES_MAX 65536
#endif

/* lb4_services scopes: internal entries exist only when in-cluster clients see other
 * endpoints than external ones (traffic policies); lookups fall back to ALL. */
#define LB_SCOPE_ALL 0
#define LB_SCOPE_INTERNAL 1

#define SVC_F_AFFINITY (1 << 0)    /* ClientIP session affinity */
#define SVC_F_DROP_EMPTY (1 << 1)  /* no endpoint here but some elsewhere: drop, never reject */
#define SVC_F_EXTERNAL (1 << 2)    /* NodePort, externalIP or load-balancer IP frontend */
#define SVC_F_SOURCE_RANGES (1 << 3) /* a load-balancer IP with loadBalancerSourceRanges:
				      * new flows only from sources in lb4_source_ranges */

#define BE_F_LOCAL (1 << 0)        /* the endpoint is a pod on this node */

#define CT_ORIGINAL 0
#define CT_REPLY 1

#define CT_F_SNAT (1 << 0)
#define CT_F_HAIRPIN (1 << 1)
#define CT_F_CLOSING (1 << 2)      /* a FIN passed: the flow ends once idle */

/* A frontend is one element: slot 0 holds the count and the first LB4_INLINE backends,
 * so a sync writes one element per frontend. Backends past LB4_INLINE (large Services)
 * sit in slot entries LB4_INLINE+1..count, one each in backends[0]. */
#define LB4_INLINE 8

struct lb4_key {
	__be32 address;
	__be16 dport;
	__u16 slot;
	__u8 proto;
	__u8 scope;
	__u16 pad;
};

/* A backend is its address and port: conntrack and affinity entries hold those, and a
 * flow keeps its backend only while the frontend still lists it. */
struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 flags;
	__u8 pad;
};

struct lb4_service {
	__u16 count;               /* backends of this frontend */
	__u16 flags;
	__u32 svc_id;              /* names the Service port for conntrack and affinity */
	__u32 affinity_timeout_s;
	__u32 pad;
	struct lb4_backend backends[LB4_INLINE];
};

/* loadBalancerSourceRanges: one LPM trie entry per (Service port, allowed network). The
 * prefix covers the whole svc_id and then the network's bits of the source address. */
struct lb4_range_key {
	__u32 prefixlen;           /* 32 + the network's prefix length */
	__u32 svc_id;
	__be32 address;
};

struct lb4_range {
	__u32 pad;                 /* presence is the answer */
};

struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

/* What a packet matching the key is rewritten to. */
struct ct4_entry {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 svc_id;
	__u16 flags;
	__u16 slot;                /* where the backend was picked (1-based) */
	__u32 pad;
	__u64 created_ns;
	__u64 seen_ns;
};

struct affinity_key {
	__be32 client;
	__u32 svc_id;
};

struct affinity_val {
	__be32 address;
	__be16 port;
	__u16 slot;
	__u64 seen_ns;
};

/* Non-first fragments carry no ports: the first fragment leaves them here. */
struct frag4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

struct frag4_ports {
	__be16 sport;
	__be16 dport;
};

/* Socket-level translation: (socket, backend) -> the Service address the socket asked for. */
struct sock4_key {
	__u64 cookie;
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct sock4_val {
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct node_config {
	__u64 netns_cookie;        /* socket hooks act only on sockets of the node's namespace */
	__be32 node_ip;            /* SNAT address for NodePort traffic to remote endpoints */
	__be32 hairpin_ip;         /* link-local SNAT address when a pod reaches itself */
	__be32 cluster_cidr;
	__be32 cluster_mask;
	__u16 snat_port_min;       /* host order */
	__u16 snat_port_max;
	__u32 saved_sysctls;       /* install() records what uninstall() restores */
	__u32 build;               /* the loader's build digest: other builds are not reused */
	__u32 pad;
};

BPF_F_TABLE("hash", struct lb4_key, struct lb4_service, lb4_services, LB4_SERVICES_MAX, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct ct4_key, struct ct4_entry, ct4, CT4_MAX);
BPF_TABLE("lru_hash", struct affinity_key, struct affinity_val, affinity, AFFINITY_MAX);
BPF_TABLE("lru_hash", struct frag4_key, struct frag4_ports, frag4, FRAG4_MAX);
BPF_TABLE("lru_hash", struct sock4_key, struct sock4_val, sock4_revnat, SOCK4_REVNAT_MAX);
BPF_ARRAY(node_config, struct node_config, 1);
BPF_F_TABLE("lpm_trie", struct lb4_range_key, struct lb4_range, lb4_source_ranges,
	    LB4_SOURCE_RANGES_MAX, BPF_F_NO_PREALLOC);

SVB_INLINE struct node_config *node_config_get(void)
{
	__u32 zero = 0;
	return node_config.lookup(&zero);
}

#endif
