/* Services reached from outside the node: a tc (tcx) ingress program on the node's
 * interfaces.
 *
 * A packet from outside to a frontend of outside scope (node address and NodePort,
 * externalIP, load-balancer IP) starts a flow: an endpoint is picked, the packet's
 * destination is rewritten to it and, unless the Service keeps the client's address
 * (externalTrafficPolicy Local), its source to the node's address and a port of its own.
 * Both directions are remembered in ferry_nat4 (IPv6: ferry_nat6), so later packets of
 * the flow, and the endpoint's replies arriving on whichever interface, are rewritten
 * without a Service lookup. The rewritten packet goes on up the stack, which routes it:
 * the node must forward (net.ipv4.ip_forward=1, net.ipv6.conf.all.forwarding=1) and, for
 * IPv4, accept packets that carry one of its own addresses as their source
 * (net.ipv4.conf.all.accept_local=1), which every SNATed packet and every reply
 * translated back does; IPv6 has no such check (an IPv6 NodePort works without any).
 *
 * Why not redirect instead: looking the route up here (bpf_fib_lookup) and sending the
 * packet straight out of the right interface (bpf_redirect_neigh, not GPL-only), as
 * Cilium does, would skip the stack's routing and so the accept_local check. But the
 * kernel declares bpf_fib_lookup GPL-only (net/core/filter.c, bpf_skb_fib_lookup_proto:
 * `.gpl_only = true`), and the verifier refuses a GPL-only helper in a program whose
 * license string is not GPL-compatible (kernel/bpf/verifier.c, check_helper_call: "cannot
 * call GPL-restricted function from non-GPL compatible program"). The compatible strings
 * are those of include/linux/license.h, license_is_gpl_compatible(): "GPL", "GPL v2",
 * "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL". This
 * program says "Apache-2.0", the project's licence; offering it also under the GPL
 * (e.g. "Dual BSD/GPL", as Cilium's datapath does) is a licensing decision for the
 * project's lead, not one made in code. Until then the daemon sets accept_local.
 *
 * loadBalancerSourceRanges: a Service with ranges opens new flows only from sources inside
 * them (an LPM trie keyed by Service id and address); others are dropped, as the
 * nftables back end's firewall chain does. Session affinity (ClientIP) remembers the
 * endpoint per client address and Service; it applies when a flow starts, so a flow keeps
 * its endpoint for its life as it does in conntrack.
 *
 * TCP and UDP, IPv4 and IPv6; IPv4 options, fragments and IPv6 extension headers pass
 * untranslated. An IPv6 address is rewritten with the L4 checksum fixed from
 * bpf_csum_diff over the 16 bytes (IPv6 has no header checksum). A Service without
 * endpoints drops new flows (a cgroup program can refuse a connect, a tc program can only
 * drop).
 *
 * How flows end: each entry records when a packet last matched it (at most one write a
 * second) and whether a FIN or RST passed in its direction; the daemon's sweep
 * (ebpf/src/flows.rs) deletes both entries of a flow idle past its timeout, as conntrack
 * would, and LRU eviction stays the last resort when the table is full. A SYN that
 * matches a flow which saw a FIN or RST ends it here at once and starts a new one with a
 * fresh endpoint choice (conntrack does the same for a SYN in TIME_WAIT): a client that
 * reuses its port right after a close is not sent to the old, maybe gone, endpoint.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ferry.h"
#include "layout_check.h"
#include "service_maps.h"

char LICENSE[] SEC("license") = "Apache-2.0";

/* Source ports for SNAT: above Linux's default ephemeral range (32768-60999), so the
 * node's own connections do not meet them. */
#define SNAT_PORT_MIN 61000
#define SNAT_PORT_COUNT 4536
#define SNAT_PORT_TRIES 8

/* Written by this program: a flow as seen on the wire -> what to rewrite it to. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRY_MAX_NAT_FLOWS);
	__type(key, struct ferry_flow4);
	__type(value, struct ferry_nat4_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_nat4 SEC(".maps");

/* The same for IPv6 flows. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRY_MAX_NAT_FLOWS);
	__type(key, struct ferry_flow6);
	__type(value, struct ferry_nat6_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_nat6 SEC(".maps");

/* Written by the daemon: (Service, source range) for Services with
 * FERRY_SVC_SOURCE_RANGES; a new flow's source must fall in one of its Service's. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FERRY_MAX_SOURCE_RANGES);
	__type(key, struct ferry_range_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_source_ranges SEC(".maps");

/* Written by this program: (client address, Service) -> endpoint, for sessionAffinity
 * ClientIP from outside; valid while new flows come within the Service's timeout. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRY_MAX_AFFINITY);
	__type(key, struct ferry_client_key);
	__type(value, struct ferry_sticky);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_client_affinity SEC(".maps");

/* Written by the daemon: the node's IPv4 SNAT address. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ferry_node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_node_config SEC(".maps");

/* Written by the daemon: the node's IPv6 SNAT address (all zero: none yet). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ferry_node_config6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_node_config6 SEC(".maps");

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define L4_OFF (ETH_HLEN + sizeof(struct iphdr))
#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define L4_OFF6 (ETH_HLEN + sizeof(struct ipv6hdr))

enum verdict { NOT_A_SERVICE, TRANSLATED, NO_ENDPOINT, SOURCE_NOT_ALLOWED };

/* The outside frontend a new flow goes to; `daddr` as the maps hold addresses. */
static __always_inline struct ferry_svc *outside_frontend(const __u32 daddr[4], __u16 dport,
							   __u8 proto)
{
	struct ferry_svc_key skey = {};
	__builtin_memcpy(skey.ip, daddr, sizeof(skey.ip));
	skey.port = dport;
	skey.proto = proto;
	skey.scope = FERRY_SCOPE_OUTSIDE;
	return bpf_map_lookup_elem(&ferry_services, &skey);
}

/* Whether `saddr` may open a flow to `svc` (loadBalancerSourceRanges). */
static __always_inline int source_allowed(const struct ferry_svc *svc, const __u32 saddr[4])
{
	if (!(svc->flags & FERRY_SVC_SOURCE_RANGES))
		return 1;
	struct ferry_range_key rkey = { .prefixlen = 32 + 128, .svc_id = svc->id };
	__builtin_memcpy(rkey.ip, saddr, sizeof(rkey.ip));
	return bpf_map_lookup_elem(&ferry_source_ranges, &rkey) != NULL;
}

/* The endpoint for a new flow from `saddr`: the one session affinity remembers for this
 * client while it holds, else a random slot (remembered when the Service has affinity). */
static __always_inline struct ferry_sockaddr *pick_endpoint(const struct ferry_svc *svc,
							    const __u32 saddr[4],
							    struct ferry_sockaddr *buf)
{
	__u64 now = 0;
	struct ferry_client_key ckey = {};
	if (svc->affinity_timeout_s) {
		now = bpf_ktime_get_ns();
		__builtin_memcpy(ckey.ip, saddr, sizeof(ckey.ip));
		ckey.svc_id = affinity_id(svc);
		struct ferry_sticky *a = bpf_map_lookup_elem(&ferry_client_affinity, &ckey);
		if (a && affinity_holds(svc, a, now)) {
			a->last_used_ns = now;
			*buf = a->backend;
			return buf;
		}
	}
	struct ferry_backend_key bkey = { .svc_id = svc->id,
					  .slot = bpf_get_prandom_u32() % svc->count };
	struct ferry_sockaddr *be = bpf_map_lookup_elem(&ferry_backends, &bkey);
	if (!be)
		return NULL;
	*buf = *be;
	if (svc->affinity_timeout_s) {
		struct ferry_sticky chosen = { .last_used_ns = now, .slot = bkey.slot, .backend = *be };
		bpf_map_update_elem(&ferry_client_affinity, &ckey, &chosen, BPF_ANY);
	}
	return buf;
}

/* The checks and choice every new flow makes: frontend, source ranges, endpoint. */
static __always_inline enum verdict choose(const __u32 saddr[4], const __u32 daddr[4],
					   __u16 dport, __u8 proto, struct ferry_sockaddr *be,
					   int *keep_source)
{
	struct ferry_svc *svc = outside_frontend(daddr, dport, proto);
	if (!svc)
		return NOT_A_SERVICE;
	if (!source_allowed(svc, saddr))
		return SOURCE_NOT_ALLOWED;
	if (svc->count == 0)
		return NO_ENDPOINT;
	if (!pick_endpoint(svc, saddr, be))
		return NO_ENDPOINT;
	/* The daemon programs only endpoints of the frontend's family. */
	if (is_v4_mapped(be->ip) != is_v4_mapped(daddr))
		return NO_ENDPOINT;
	*keep_source = svc->flags & FERRY_SVC_KEEP_SOURCE;
	return TRANSLATED;
}

static __always_inline __u16 snat_port(void)
{
	return bpf_htons(SNAT_PORT_MIN + bpf_get_prandom_u32() % SNAT_PORT_COUNT);
}

/* Picks the endpoint and source of a new IPv4 flow `in`, and remembers both directions. */
static __always_inline enum verdict new_flow4(const struct ferry_flow4 *in, struct ferry_flow4 *out,
					      __u32 seen)
{
	__u32 saddr[4] = { 0, 0, bpf_htonl(0xffff), in->saddr };
	__u32 daddr[4] = { 0, 0, bpf_htonl(0xffff), in->daddr };
	struct ferry_sockaddr be;
	int keep_source = 0;
	enum verdict v = choose(saddr, daddr, in->dport, in->proto, &be, &keep_source);
	if (v != TRANSLATED)
		return v;

	out->saddr = in->saddr;
	out->daddr = be.ip[3];
	out->sport = in->sport;
	out->dport = be.port;
	out->proto = in->proto;
	if (!keep_source) {
		__u32 zero = 0;
		struct ferry_node_config *cfg = bpf_map_lookup_elem(&ferry_node_config, &zero);
		/* Without an address to SNAT to, replies could not find their way back. */
		if (!cfg || !cfg->snat_ip4)
			return NO_ENDPOINT;
		out->saddr = cfg->snat_ip4;
		int found = 0;
		for (int i = 0; i < SNAT_PORT_TRIES; i++) {
			__u16 port = snat_port();
			struct ferry_flow4 reply = { .saddr = out->daddr, .daddr = out->saddr,
						     .sport = out->dport, .dport = port,
						     .proto = in->proto };
			if (!bpf_map_lookup_elem(&ferry_nat4, &reply)) {
				out->sport = port;
				found = 1;
				break;
			}
		}
		if (!found)
			return NO_ENDPOINT;
	}
	struct ferry_flow4 reply = { .saddr = out->daddr, .daddr = out->saddr, .sport = out->dport,
				     .dport = out->sport, .proto = in->proto };
	__u64 now = bpf_ktime_get_ns();
	struct ferry_nat4_entry back = { .to = { .saddr = in->daddr, .daddr = in->saddr,
						 .sport = in->dport, .dport = in->sport,
						 .proto = in->proto },
					 .last_seen_ns = now };
	/* NOEXIST: two first packets racing for one port; the loser drops, TCP retries. */
	if (bpf_map_update_elem(&ferry_nat4, &reply, &back, BPF_NOEXIST))
		return NO_ENDPOINT;
	struct ferry_nat4_entry forth = { .to = *out, .last_seen_ns = now, .flags = seen };
	bpf_map_update_elem(&ferry_nat4, in, &forth, BPF_ANY);
	return TRANSLATED;
}

static __always_inline int addr6_is_zero(const __u32 a[4])
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

/* The reverse of flow `f`: what its replies look like on the wire. */
static __always_inline void reverse6(const struct ferry_flow6 *f, struct ferry_flow6 *r)
{
	__builtin_memcpy(r->saddr, f->daddr, sizeof(r->saddr));
	__builtin_memcpy(r->daddr, f->saddr, sizeof(r->daddr));
	r->sport = f->dport;
	r->dport = f->sport;
	r->proto = f->proto;
}

/* new_flow4 for IPv6. */
static __always_inline enum verdict new_flow6(const struct ferry_flow6 *in, struct ferry_flow6 *out,
					      __u32 seen)
{
	struct ferry_sockaddr be;
	int keep_source = 0;
	enum verdict v = choose(in->saddr, in->daddr, in->dport, in->proto, &be, &keep_source);
	if (v != TRANSLATED)
		return v;

	__builtin_memcpy(out->saddr, in->saddr, sizeof(out->saddr));
	__builtin_memcpy(out->daddr, be.ip, sizeof(out->daddr));
	out->sport = in->sport;
	out->dport = be.port;
	out->proto = in->proto;
	struct ferry_flow6 reply = {};
	if (!keep_source) {
		__u32 zero = 0;
		struct ferry_node_config6 *cfg = bpf_map_lookup_elem(&ferry_node_config6, &zero);
		if (!cfg || addr6_is_zero(cfg->snat_ip6))
			return NO_ENDPOINT;
		__builtin_memcpy(out->saddr, cfg->snat_ip6, sizeof(out->saddr));
		int found = 0;
		for (int i = 0; i < SNAT_PORT_TRIES; i++) {
			out->sport = snat_port();
			reverse6(out, &reply);
			if (!bpf_map_lookup_elem(&ferry_nat6, &reply)) {
				found = 1;
				break;
			}
		}
		if (!found)
			return NO_ENDPOINT;
	}
	reverse6(out, &reply);
	__u64 now = bpf_ktime_get_ns();
	struct ferry_nat6_entry back = { .last_seen_ns = now };
	reverse6(in, &back.to);
	if (bpf_map_update_elem(&ferry_nat6, &reply, &back, BPF_NOEXIST))
		return NO_ENDPOINT;
	struct ferry_nat6_entry forth = { .to = *out, .last_seen_ns = now, .flags = seen };
	bpf_map_update_elem(&ferry_nat6, in, &forth, BPF_ANY);
	return TRANSLATED;
}

/* The L4 checksum's offset, and the flag that keeps a UDP checksum of 0 ("none") at 0. */
static __always_inline __u32 l4_csum_off(__u32 l4_off, __u8 proto)
{
	return l4_off + (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
					      : offsetof(struct udphdr, check));
}

static __always_inline __u64 mangled0(__u8 proto)
{
	return proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrites the ports at `l4_off` from `from` to `to`, keeping the L4 checksum. */
static __always_inline void rewrite_ports(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
					  __u16 from_sport, __u16 from_dport, __u16 to_sport,
					  __u16 to_dport)
{
	__u32 csum_off = l4_csum_off(l4_off, proto);
	if (from_sport != to_sport) {
		bpf_l4_csum_replace(skb, csum_off, from_sport, to_sport, mangled0(proto) | 2);
		bpf_skb_store_bytes(skb, l4_off, &to_sport, 2, 0);
	}
	if (from_dport != to_dport) {
		bpf_l4_csum_replace(skb, csum_off, from_dport, to_dport, mangled0(proto) | 2);
		bpf_skb_store_bytes(skb, l4_off + 2, &to_dport, 2, 0);
	}
}

/* Rewrites addresses and ports from `from` to `to`, keeping the IP and L4 checksums. */
static __always_inline void rewrite4(struct __sk_buff *skb, const struct ferry_flow4 *from,
				     const struct ferry_flow4 *to)
{
	__u32 csum_off = l4_csum_off(L4_OFF, from->proto);
	__u64 flags = mangled0(from->proto) | BPF_F_PSEUDO_HDR | 4;
	if (from->saddr != to->saddr) {
		bpf_l4_csum_replace(skb, csum_off, from->saddr, to->saddr, flags);
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, from->saddr, to->saddr, 4);
		bpf_skb_store_bytes(skb, IP_SRC_OFF, &to->saddr, 4, 0);
	}
	if (from->daddr != to->daddr) {
		bpf_l4_csum_replace(skb, csum_off, from->daddr, to->daddr, flags);
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, from->daddr, to->daddr, 4);
		bpf_skb_store_bytes(skb, IP_DST_OFF, &to->daddr, 4, 0);
	}
	rewrite_ports(skb, L4_OFF, from->proto, from->sport, from->dport, to->sport, to->dport);
}

/* Rewrites one IPv6 address at `off`: the L4 checksum takes the difference of the 16
 * bytes (its pseudo-header covers them), then the bytes are stored. */
static __always_inline void rewrite_addr6(struct __sk_buff *skb, __u32 off, __u8 proto,
					  const __u32 from[4], const __u32 to[4])
{
	if (from[0] == to[0] && from[1] == to[1] && from[2] == to[2] && from[3] == to[3])
		return;
	__s64 diff = bpf_csum_diff((__be32 *)from, 16, (__be32 *)to, 16, 0);
	bpf_l4_csum_replace(skb, l4_csum_off(L4_OFF6, proto), 0, diff,
			    mangled0(proto) | BPF_F_PSEUDO_HDR);
	bpf_skb_store_bytes(skb, off, to, 16, 0);
}

static __always_inline void rewrite6(struct __sk_buff *skb, const struct ferry_flow6 *from,
				     const struct ferry_flow6 *to)
{
	rewrite_addr6(skb, IP6_SRC_OFF, from->proto, from->saddr, to->saddr);
	rewrite_addr6(skb, IP6_DST_OFF, from->proto, from->daddr, to->daddr);
	rewrite_ports(skb, L4_OFF6, from->proto, from->sport, from->dport, to->sport, to->dport);
}

/* How often a busy flow's entry gets a new timestamp: the sweep's timeouts are seconds. */
#define REFRESH_NS 1000000000ULL

/* What a packet at `l4` tells its flow entry (FERRY_FLOW_SEEN, and FIN or RST for TCP),
 * and in `opens` whether it opens a connection (TCP SYN without ACK). A TCP header cut
 * short tells only SEEN. */
static __always_inline __u32 packet_flags(void *l4, void *data_end, __u8 proto, int *opens)
{
	*opens = 0;
	if (proto != IPPROTO_TCP)
		return FERRY_FLOW_SEEN;
	struct tcphdr *tcp = l4;
	if ((void *)(tcp + 1) > data_end)
		return FERRY_FLOW_SEEN;
	*opens = tcp->syn && !tcp->ack;
	return FERRY_FLOW_SEEN | (tcp->fin ? FERRY_FLOW_FIN : 0) | (tcp->rst ? FERRY_FLOW_RST : 0);
}

/* Records a packet in its flow's entry. Plain writes: two CPUs racing on one flow's entry
 * at worst lose a refresh or a flag that the flow's next packet sets again. */
static __always_inline void touch(__u64 *last_seen_ns, __u32 *flags, __u32 seen)
{
	if ((*flags | seen) != *flags)
		*flags |= seen;
	__u64 now = bpf_ktime_get_ns();
	if (now - *last_seen_ns >= REFRESH_NS)
		*last_seen_ns = now;
}

#define FLOW_CLOSED (FERRY_FLOW_FIN | FERRY_FLOW_RST)

/* A known IPv4 flow whose packet `key` opens a new connection: if the flow was closed (a
 * FIN or RST passed either way), both its entries go and the caller starts afresh. */
static __always_inline struct ferry_nat4_entry *reopen4(const struct ferry_flow4 *key,
							struct ferry_nat4_entry *e)
{
	struct ferry_flow4 partner = { .saddr = e->to.daddr, .daddr = e->to.saddr,
				       .sport = e->to.dport, .dport = e->to.sport,
				       .proto = key->proto };
	struct ferry_nat4_entry *p = bpf_map_lookup_elem(&ferry_nat4, &partner);
	if (!((e->flags | (p ? p->flags : 0)) & FLOW_CLOSED))
		return e;
	bpf_map_delete_elem(&ferry_nat4, &partner);
	bpf_map_delete_elem(&ferry_nat4, key);
	return NULL;
}

/* reopen4 for IPv6. */
static __always_inline struct ferry_nat6_entry *reopen6(const struct ferry_flow6 *key,
							struct ferry_nat6_entry *e)
{
	struct ferry_flow6 partner = {};
	reverse6(&e->to, &partner);
	struct ferry_nat6_entry *p = bpf_map_lookup_elem(&ferry_nat6, &partner);
	if (!((e->flags | (p ? p->flags : 0)) & FLOW_CLOSED))
		return e;
	bpf_map_delete_elem(&ferry_nat6, &partner);
	bpf_map_delete_elem(&ferry_nat6, key);
	return NULL;
}

static __always_inline int verdict_action(enum verdict v)
{
	return v == NO_ENDPOINT || v == SOURCE_NOT_ALLOWED ? TC_ACT_SHOT : TC_ACT_OK;
}

static __always_inline int ingress4(struct __sk_buff *skb, void *data_end, struct iphdr *ip)
{
	if ((void *)(ip + 1) > data_end || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	/* Both TCP and UDP headers start with the source and destination ports. */
	__u16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > data_end)
		return TC_ACT_OK;

	struct ferry_flow4 key = { .saddr = ip->saddr, .daddr = ip->daddr, .sport = ports[0],
				   .dport = ports[1], .proto = ip->protocol };
	int opens;
	__u32 seen = packet_flags(ports, data_end, ip->protocol, &opens);
	struct ferry_flow4 to;
	struct ferry_nat4_entry *known = bpf_map_lookup_elem(&ferry_nat4, &key);
	if (known && opens)
		known = reopen4(&key, known);
	if (known) {
		touch(&known->last_seen_ns, &known->flags, seen);
		to = known->to;
	} else {
		enum verdict v = new_flow4(&key, &to, seen);
		if (v != TRANSLATED)
			return verdict_action(v);
	}
	rewrite4(skb, &key, &to);
	return TC_ACT_OK;
}

static __always_inline int ingress6(struct __sk_buff *skb, void *data_end, struct ipv6hdr *ip6)
{
	if ((void *)(ip6 + 1) > data_end)
		return TC_ACT_OK;
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return TC_ACT_OK;
	__u16 *ports = (void *)(ip6 + 1);
	if ((void *)(ports + 2) > data_end)
		return TC_ACT_OK;

	struct ferry_flow6 key = { .sport = ports[0], .dport = ports[1], .proto = ip6->nexthdr };
	__builtin_memcpy(key.saddr, &ip6->saddr, sizeof(key.saddr));
	__builtin_memcpy(key.daddr, &ip6->daddr, sizeof(key.daddr));
	int opens;
	__u32 seen = packet_flags(ports, data_end, ip6->nexthdr, &opens);
	struct ferry_flow6 to = {};
	struct ferry_nat6_entry *known = bpf_map_lookup_elem(&ferry_nat6, &key);
	if (known && opens)
		known = reopen6(&key, known);
	if (known) {
		touch(&known->last_seen_ns, &known->flags, seen);
		to = known->to;
	} else {
		enum verdict v = new_flow6(&key, &to, seen);
		if (v != TRANSLATED)
			return verdict_action(v);
	}
	rewrite6(skb, &key, &to);
	return TC_ACT_OK;
}

SEC("classifier")
int ferry_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return ingress4(skb, data_end, (void *)(eth + 1));
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return ingress6(skb, data_end, (void *)(eth + 1));
	return TC_ACT_OK;
}
