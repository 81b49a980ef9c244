/* Map layouts shared by Ferry's eBPF programs and the Rust loader (ebpf/src/maps.rs).
 *
 * Addresses are always 16 bytes in network byte order: an IPv4 address is stored
 * v4-mapped (::ffff:a.b.c.d), so one map serves both families and an IPv6 socket
 * connecting to ::ffff:<ClusterIP> finds the IPv4 Service. Ports are in network byte
 * order. Every struct is padded explicitly: hash maps compare keys byte for byte, so no
 * byte may be left to the compiler.
 *
 * build.rs checks every size and offset here against ebpf/src/layout.rs (the table the
 * Rust mirrors are checked against too): see the generated layout_check.h.
 */
#ifndef FERRY_H
#define FERRY_H

#include <linux/types.h>

/* Who a frontend entry serves: sockets on the node (its Pods and processes, through the
 * cgroup programs) or packets from outside (the tc programs). One address and port can
 * lead to different endpoints for each: externalTrafficPolicy applies only outside. */
#define FERRY_SCOPE_INSIDE 0
#define FERRY_SCOPE_OUTSIDE 1

/* A frontend: ClusterIP, externalIP, load-balancer IP or node address (NodePort), port,
 * IP protocol and scope. */
struct ferry_svc_key {
	__u32 ip[4];
	__u16 port;
	__u8 proto;
	__u8 scope;
};

/* What the daemon programmed for a frontend. `count` endpoints sit in ferry_backends
 * at slots 0..count-1; count 0 means "refuse" (a Service without endpoints). */
struct ferry_svc {
	__u32 id;
	__u32 count;
	__u32 affinity_timeout_s; /* sessionAffinity ClientIP timeout; 0: no affinity */
	__u32 flags;              /* FERRY_SVC_* */
};

/* Outside scope: keep the client's address (externalTrafficPolicy Local), no SNAT. */
#define FERRY_SVC_KEEP_SOURCE 1
/* Outside scope: new flows only from sources in ferry_source_ranges under this Service's
 * id (loadBalancerSourceRanges); others are dropped. */
#define FERRY_SVC_SOURCE_RANGES 2

struct ferry_backend_key {
	__u32 svc_id;
	__u32 slot;
};

/* An endpoint, or in ferry_revnat's values the frontend a socket asked for. */
struct ferry_sockaddr {
	__u32 ip[4];
	__u16 port;
	__u16 pad;
};

/* In ferry_sock_peer, a connected socket's storage: the endpoint it was sent to and the
 * frontend it asked for. */
struct ferry_sock_peer {
	struct ferry_sockaddr endpoint;
	struct ferry_sockaddr frontend;
};

/* A socket (its cookie) and an address it talks to: in ferry_revnat the endpoint,
 * in ferry_udp_sticky the frontend. */
struct ferry_sock_key {
	__u64 cookie;
	__u32 ip[4];
	__u16 port;
	__u8 proto;
	__u8 pad;
	__u32 pad2;
};

/* The client of session affinity: its network namespace (one per Pod; the node's own
 * for host processes). At connect time a socket has no source address yet, so the
 * netns cookie stands for the "ClientIP" Kubernetes means. */
struct ferry_affinity_key {
	__u64 netns_cookie;
	__u32 svc_id; /* the affinity group: affinity_id() in service_maps.h */
	__u32 pad;
};

/* An endpoint chosen earlier, kept while it is used (affinity, UDP stickiness). It is
 * reused only while slot `slot` of the Service still holds the same endpoint. */
struct ferry_sticky {
	__u64 last_used_ns;
	__u32 slot;
	__u32 pad;
	struct ferry_sockaddr backend;
	__u32 pad2;
};

/* An LPM trie key of ferry_source_ranges: a Service and a client address range.
 * `prefixlen` counts the bits matched after it: svc_id's 32, then the address's (an IPv4
 * /24 is 32 + 96 + 24, being v4-mapped). */
struct ferry_range_key {
	__u32 prefixlen;
	__u32 svc_id;
	__u32 ip[4];
};

/* The client of session affinity from outside: its address (what Kubernetes means by
 * ClientIP, as a packet carries it) and the Service. */
struct ferry_client_key {
	__u32 ip[4];
	__u32 svc_id; /* the affinity group, as in ferry_affinity_key */
};

/* An IPv4 flow as the tc programs see it on the wire, and what to rewrite it to. Each
 * translated connection has two entries in ferry_nat4: client->frontend becomes
 * source->endpoint, and endpoint->source becomes frontend->client. */
struct ferry_flow4 {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* An IPv6 flow, as ferry_flow4 (ferry_nat6). */
struct ferry_flow6 {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* What a flow entry of ferry_nat4 (ferry_nat6) has seen, in `flags`: packets after the one
 * that made it, and TCP's FIN and RST in its direction. The daemon's sweep reads them with
 * `last_seen_ns` to end flows as conntrack would (ebpf/src/flows.rs has the timeouts). */
#define FERRY_FLOW_SEEN 1
#define FERRY_FLOW_FIN 2
#define FERRY_FLOW_RST 4

/* A value of ferry_nat4: what a flow is rewritten to, when a packet of it last passed
 * (bpf_ktime_get_ns, CLOCK_MONOTONIC; refreshed at most once a second per entry, so
 * packets of a busy flow do not all write it) and FERRY_FLOW_* flags. */
struct ferry_nat4_entry {
	struct ferry_flow4 to;
	__u64 last_seen_ns;
	__u32 flags;
	__u32 pad;
};

/* A value of ferry_nat6, as ferry_nat4_entry. */
struct ferry_nat6_entry {
	struct ferry_flow6 to;
	__u64 last_seen_ns;
	__u32 flags;
	__u32 pad;
};

/* The node's IPv6 SNAT address (array, one entry; all zero: not set). */
struct ferry_node_config6 {
	__u32 snat_ip6[4];
};

/* Node settings the tc programs read (array, one entry). */
struct ferry_node_config {
	__u32 snat_ip4; /* the node's address that SNATed packets leave with */
	__u32 pad;
};

#endif
