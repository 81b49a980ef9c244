/* Socket-level Service load balancing: cgroup sock_addr programs.
 *
 * connect4/6 and sendmsg4/6 rewrite a socket's destination from a Service frontend
 * (ClusterIP, externalIP, load-balancer IP) to one of its endpoints before the kernel
 * routes anything, so no packet ever carries the Service address and no NAT state is
 * kept per packet. recvmsg4/6 and getpeername4/6 rewrite the endpoint back to the
 * frontend, so the application sees the address it asked for (UDP replies, getpeername).
 *
 * Which endpoints a frontend has is the daemon's plan (ready ones, else serving and
 * terminating ones, only local ones under internalTrafficPolicy Local): the map holds
 * the list the plan chose, and these programs only pick among it.
 *
 * Maps, their keys and values are described in ferry.h; the daemon writes ferry_services
 * and ferry_backends, these programs write the three LRU maps.
 *
 * Cost, measured by proxy/benches/service_latency.rs (kernel BPF run-time statistics,
 * Linux 6.18, 2 shared CPUs): connect4 runs 600-640 ns on a connect to a ClusterIP and
 * 50-125 ns on one to no Service: the 5% a ClusterIP adds to a connect's median. About
 * 450 ns of it is remembering the frontend (a build without it ran 124-130 ns). In the
 * ferry_revnat LRU hash that cost the same as in socket storage (598-607 ns against
 * 634-642 ns, same connect p50), but socket storage lives exactly as long as its socket,
 * where the LRU hash evicted live connections' entries once a node had more connected
 * sockets than FERRY_MAX_SOCKETS; the lookup that forgets an old frontend costs a connect
 * to no Service ~70 ns. Per-CPU LRU lists (BPF_F_NO_COMMON_LRU) were slower (689-695 ns).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <asm-generic/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ferry.h"
#include "layout_check.h"

/* No GPL-only helper is used, so the project's own license applies. */
char LICENSE[] SEC("license") = "Apache-2.0";

#include "service_maps.h"

/* Written by connect/sendmsg: (socket, endpoint) -> frontend, read by recvmsg and
 * getpeername. Keyed by endpoint too, so one unconnected UDP socket can talk to several
 * Services. LRU: entries of closed sockets age out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRY_MAX_SOCKETS);
	__type(key, struct ferry_sock_key);
	__type(value, struct ferry_sockaddr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_revnat SEC(".maps");

/* Written by connect: the endpoint a connected socket was sent to and the frontend it
 * asked for, in the socket's own storage (freed with the socket, nothing to age out),
 * read by getpeername and by recvmsg on a connected UDP socket. A connect to a Service
 * costs ~0.1 us this way against ~0.5 us for an LRU hash update (which takes the LRU's
 * lock and may refill its free list); ferry_revnat keeps serving unconnected UDP
 * sockets, which talk to several frontends and have no single peer. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ferry_sock_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_sock_peer SEC(".maps");

/* Written by sendmsg: (socket, frontend) -> endpoint, so the datagrams of one
 * unconnected UDP socket keep going to the endpoint its first one went to. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRY_MAX_SOCKETS);
	__type(key, struct ferry_sock_key);
	__type(value, struct ferry_sticky);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_udp_sticky SEC(".maps");

/* Written by connect/sendmsg: (client netns, Service) -> endpoint, for
 * sessionAffinity ClientIP; valid while used within the Service's timeout. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRY_MAX_AFFINITY);
	__type(key, struct ferry_affinity_key);
	__type(value, struct ferry_sticky);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_affinity SEC(".maps");

#define SYS_PROCEED 1
#define SYS_REJECT 0

enum verdict { NOT_A_SERVICE, TRANSLATED, NO_ENDPOINT };

/* Picks the endpoint for a socket going to `key`. `udp_sendmsg` is set for sendmsg: the
 * socket's earlier choice for this frontend wins, then affinity, then a random slot. */
static __always_inline enum verdict pick_endpoint(void *ctx, const struct ferry_svc_key *key,
						  int udp_sendmsg,
						  struct ferry_sockaddr *out)
{
	struct ferry_svc *svc = bpf_map_lookup_elem(&ferry_services, key);
	if (!svc)
		return NOT_A_SERVICE;
	if (svc->count == 0)
		return NO_ENDPOINT;

	__u64 now = bpf_ktime_get_ns();
	struct ferry_sock_key skey = {};
	if (udp_sendmsg) {
		skey.cookie = bpf_get_socket_cookie(ctx);
		__builtin_memcpy(skey.ip, key->ip, sizeof(skey.ip));
		skey.port = key->port;
		skey.proto = key->proto;
		struct ferry_sticky *s = bpf_map_lookup_elem(&ferry_udp_sticky, &skey);
		if (s && sticky_still_valid(svc, s)) {
			*out = s->backend;
			s->last_used_ns = now;
			return TRANSLATED;
		}
	}

	struct ferry_sticky chosen = { .last_used_ns = now };
	int remembered = 0;
	struct ferry_affinity_key akey = {};
	if (svc->affinity_timeout_s) {
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.svc_id = affinity_id(svc);
		struct ferry_sticky *a = bpf_map_lookup_elem(&ferry_affinity, &akey);
		if (a && affinity_holds(svc, a, now)) {
			a->last_used_ns = now;
			chosen.slot = a->slot;
			chosen.backend = a->backend;
			remembered = 1;
		}
	}

	if (!remembered) {
		chosen.slot = bpf_get_prandom_u32() % svc->count;
		struct ferry_backend_key bkey = { .svc_id = svc->id, .slot = chosen.slot };
		struct ferry_sockaddr *be = bpf_map_lookup_elem(&ferry_backends, &bkey);
		/* The daemon writes slots before raising count, so a hole means a bug or a
		 * daemon killed mid-update: refuse rather than guess. */
		if (!be)
			return NO_ENDPOINT;
		chosen.backend = *be;
		if (svc->affinity_timeout_s)
			bpf_map_update_elem(&ferry_affinity, &akey, &chosen, BPF_ANY);
	}
	if (udp_sendmsg)
		bpf_map_update_elem(&ferry_udp_sticky, &skey, &chosen, BPF_ANY);
	*out = chosen.backend;
	return TRANSLATED;
}

/* Remembers which frontend the socket asked for, for recvmsg and getpeername: a
 * connected socket in its own storage, an unconnected UDP socket (one per destination)
 * in ferry_revnat. */
static __always_inline void remember_frontend(struct bpf_sock_addr *ctx,
					      const struct ferry_svc_key *key,
					      const struct ferry_sockaddr *be, int udp_sendmsg)
{
	if (!udp_sendmsg) {
		struct ferry_sock_peer *peer = bpf_sk_storage_get(
			&ferry_sock_peer, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (peer) {
			peer->endpoint = *be;
			__builtin_memcpy(peer->frontend.ip, key->ip, sizeof(peer->frontend.ip));
			peer->frontend.port = key->port;
			peer->frontend.pad = 0;
			return;
		}
		/* No memory for the storage: the LRU map below still serves. */
	}
	struct ferry_sock_key rkey = {};
	rkey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rkey.ip, be->ip, sizeof(rkey.ip));
	rkey.port = be->port;
	rkey.proto = key->proto;
	struct ferry_sockaddr fe = {};
	__builtin_memcpy(fe.ip, key->ip, sizeof(fe.ip));
	fe.port = key->port;
	bpf_map_update_elem(&ferry_revnat, &rkey, &fe, BPF_ANY);
}

/* A socket connected again, to no Service: its storage must not turn the new peer
 * into an old frontend (a UDP socket may connect to a Service's endpoint directly after
 * connecting to the Service). Looking up a socket without storage costs a few ns. */
static __always_inline void forget_peer(struct bpf_sock_addr *ctx, int udp_sendmsg)
{
	if (udp_sendmsg)
		return;
	struct ferry_sock_peer *peer = bpf_sk_storage_get(&ferry_sock_peer, ctx->sk, 0, 0);
	if (peer)
		peer->endpoint.port = 0; /* no endpoint has port 0 */
}

/* The verdict for a socket whose frontend has no endpoint: the syscall fails with
 * ECONNREFUSED, as it would against a closed port, instead of the EPERM a plain
 * rejection gives (bpf_set_retval, Linux 5.18). */
static __always_inline int refuse(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

static __always_inline int xlate_forward4(struct bpf_sock_addr *ctx, int udp_sendmsg)
{
	struct ferry_svc_key key = {};
	key.ip[2] = bpf_htonl(0xffff);
	key.ip[3] = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;

	struct ferry_sockaddr be;
	switch (pick_endpoint(ctx, &key, udp_sendmsg, &be)) {
	case NOT_A_SERVICE:
		forget_peer(ctx, udp_sendmsg);
		return SYS_PROCEED;
	case NO_ENDPOINT:
		return refuse();
	case TRANSLATED:
		break;
	}
	/* An IPv4 socket can only go to an IPv4 endpoint; the daemon never programs
	 * another, so this is a broken map: refuse. */
	if (!is_v4_mapped(be.ip))
		return refuse();
	ctx->user_ip4 = be.ip[3];
	ctx->user_port = be.port;
	remember_frontend(ctx, &key, &be, udp_sendmsg);
	return SYS_PROCEED;
}

static __always_inline int xlate_forward6(struct bpf_sock_addr *ctx, int udp_sendmsg)
{
	struct ferry_svc_key key = {};
	key.ip[0] = ctx->user_ip6[0];
	key.ip[1] = ctx->user_ip6[1];
	key.ip[2] = ctx->user_ip6[2];
	key.ip[3] = ctx->user_ip6[3];
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;

	struct ferry_sockaddr be;
	switch (pick_endpoint(ctx, &key, udp_sendmsg, &be)) {
	case NOT_A_SERVICE:
		forget_peer(ctx, udp_sendmsg);
		return SYS_PROCEED;
	case NO_ENDPOINT:
		return refuse();
	case TRANSLATED:
		break;
	}
	/* A v4-mapped frontend (an IPv4 Service reached from an IPv6 socket) has v4-mapped
	 * endpoints, which this socket reaches the same way. */
	ctx->user_ip6[0] = be.ip[0];
	ctx->user_ip6[1] = be.ip[1];
	ctx->user_ip6[2] = be.ip[2];
	ctx->user_ip6[3] = be.ip[3];
	ctx->user_port = be.port;
	remember_frontend(ctx, &key, &be, udp_sendmsg);
	return SYS_PROCEED;
}

/* The frontend a socket asked for, when its peer `ip`/`port` is an endpoint it was
 * sent to; NULL otherwise. */
static __always_inline struct ferry_sockaddr *frontend_of(struct bpf_sock_addr *ctx,
							  const __u32 ip[4], __u16 port, __u8 proto)
{
	struct ferry_sock_peer *peer = bpf_sk_storage_get(&ferry_sock_peer, ctx->sk, 0, 0);
	if (peer && peer->endpoint.port == port && peer->endpoint.ip[0] == ip[0] &&
	    peer->endpoint.ip[1] == ip[1] && peer->endpoint.ip[2] == ip[2] &&
	    peer->endpoint.ip[3] == ip[3])
		return &peer->frontend;
	struct ferry_sock_key rkey = {};
	rkey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rkey.ip, ip, sizeof(rkey.ip));
	rkey.port = port;
	rkey.proto = proto;
	return bpf_map_lookup_elem(&ferry_revnat, &rkey);
}

static __always_inline int xlate_reverse4(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u32 ip[4] = { 0, 0, bpf_htonl(0xffff), ctx->user_ip4 };
	struct ferry_sockaddr *fe = frontend_of(ctx, ip, (__u16)ctx->user_port, proto);
	if (fe) {
		ctx->user_ip4 = fe->ip[3];
		ctx->user_port = fe->port;
	}
	return SYS_PROCEED;
}

static __always_inline int xlate_reverse6(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u32 ip[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct ferry_sockaddr *fe = frontend_of(ctx, ip, (__u16)ctx->user_port, proto);
	if (fe) {
		ctx->user_ip6[0] = fe->ip[0];
		ctx->user_ip6[1] = fe->ip[1];
		ctx->user_ip6[2] = fe->ip[2];
		ctx->user_ip6[3] = fe->ip[3];
		ctx->user_port = fe->port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int ferry_connect4(struct bpf_sock_addr *ctx)
{
	return xlate_forward4(ctx, 0);
}

SEC("cgroup/connect6")
int ferry_connect6(struct bpf_sock_addr *ctx)
{
	return xlate_forward6(ctx, 0);
}

SEC("cgroup/sendmsg4")
int ferry_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate_forward4(ctx, 1);
}

SEC("cgroup/sendmsg6")
int ferry_sendmsg6(struct bpf_sock_addr *ctx)
{
	return xlate_forward6(ctx, 1);
}

/* recvmsg runs for UDP only; its context has no protocol to read. */
SEC("cgroup/recvmsg4")
int ferry_recvmsg4(struct bpf_sock_addr *ctx)
{
	return xlate_reverse4(ctx, IPPROTO_UDP);
}

SEC("cgroup/recvmsg6")
int ferry_recvmsg6(struct bpf_sock_addr *ctx)
{
	return xlate_reverse6(ctx, IPPROTO_UDP);
}

SEC("cgroup/getpeername4")
int ferry_getpeername4(struct bpf_sock_addr *ctx)
{
	return xlate_reverse4(ctx, (__u8)ctx->protocol);
}

SEC("cgroup/getpeername6")
int ferry_getpeername6(struct bpf_sock_addr *ctx)
{
	return xlate_reverse6(ctx, (__u8)ctx->protocol);
}
