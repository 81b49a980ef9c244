/* The maps the daemon writes, shared by the cgroup and tc programs. Both objects define
 * them identically and pin them by name, so whichever loads second reuses the first's.
 */
#ifndef FERRY_SERVICE_MAPS_H
#define FERRY_SERVICE_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ferry.h"

/* Written by the daemon: frontend -> Service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRY_MAX_SERVICES);
	__type(key, struct ferry_svc_key);
	__type(value, struct ferry_svc);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_services SEC(".maps");

/* Written by the daemon: (Service id, slot) -> endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRY_MAX_BACKENDS);
	__type(key, struct ferry_backend_key);
	__type(value, struct ferry_sockaddr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_backends SEC(".maps");

/* Written by the daemon: a frontend's Service id -> the id session affinity is kept under,
 * one per Service port and scope (that of one of its frontends), so a client keeps its
 * endpoint whichever of the port's addresses it comes by (NodePort, externalIP, LB IP), as
 * kube-proxy keeps affinity per Service port. Absent: the frontend's own id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRY_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_affinity_group SEC(".maps");

/* The id `svc`'s session affinity is kept under. An endpoint remembered under it through
 * a sibling frontend is reused only if this frontend has it at the same slot (see
 * sticky_still_valid): siblings are programmed together, so their slots agree, and where
 * they do not the client gets a fresh pick, never a wrong endpoint. */
static __always_inline __u32 affinity_id(const struct ferry_svc *svc)
{
	__u32 id = svc->id;
	__u32 *group = bpf_map_lookup_elem(&ferry_affinity_group, &id);
	return group ? *group : id;
}

/* Whether a map address (16 bytes) is an IPv4 one, stored v4-mapped. */
static __always_inline int is_v4_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

static __always_inline int same_sockaddr(const struct ferry_sockaddr *a,
					 const struct ferry_sockaddr *b)
{
	return a->ip[0] == b->ip[0] && a->ip[1] == b->ip[1] && a->ip[2] == b->ip[2] &&
	       a->ip[3] == b->ip[3] && a->port == b->port;
}

/* A remembered endpoint, if the Service still has it at the same slot. */
static __always_inline int sticky_still_valid(const struct ferry_svc *svc,
					      const struct ferry_sticky *s)
{
	if (s->slot >= svc->count)
		return 0;
	struct ferry_backend_key bkey = { .svc_id = svc->id, .slot = s->slot };
	struct ferry_sockaddr *now = bpf_map_lookup_elem(&ferry_backends, &bkey);
	return now && same_sockaddr(now, &s->backend);
}

/* Whether session affinity `s` still holds at time `now`: used within the Service's
 * timeout, and its endpoint still there. */
static __always_inline int affinity_holds(const struct ferry_svc *svc,
					  const struct ferry_sticky *s, __u64 now)
{
	return now - s->last_used_ns <= (__u64)svc->affinity_timeout_s * 1000000000ULL &&
	       sticky_still_valid(svc, s);
}

#endif
