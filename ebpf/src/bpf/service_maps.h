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

/* Whether a map address (16 bytes) is an IPv4 one, stored v4-mapped. */
static __always_inline int is_v4_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

#endif
