/* Services reached from outside the node: a tc (tcx) ingress program on the node's
 * interfaces.
 *
 * A packet from outside to a frontend of outside scope (node address and NodePort,
 * externalIP, load-balancer IP) starts a flow: an endpoint is picked, the packet's
 * destination is rewritten to it and, unless the Service keeps the client's address
 * (externalTrafficPolicy Local), its source to the node's address and a port of its own.
 * Both directions are remembered in ferry_nat4, so later packets of the flow, and the
 * endpoint's replies arriving on whichever interface, are rewritten without a Service
 * lookup. The rewritten packet goes on up the stack, which routes it: the node must
 * forward IPv4 (net.ipv4.ip_forward=1) and accept packets that carry one of its own
 * addresses as their source (net.ipv4.conf.all.accept_local=1), which every SNATed
 * packet and every reply translated back does. (Redirecting them with bpf_fib_lookup
 * and bpf_redirect_neigh, as Cilium does, would avoid that setting, but bpf_fib_lookup
 * is GPL-only and this program is Apache-2.0.)
 *
 * IPv4, TCP and UDP only; IP options and fragments pass untranslated. Flows leave
 * ferry_nat4 by LRU eviction only (no FIN tracking), and a Service without endpoints
 * drops new flows (a cgroup program can refuse a connect, a tc program can only drop).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
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
	__type(value, struct ferry_flow4);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_nat4 SEC(".maps");

/* Written by the daemon: the node's SNAT address. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ferry_node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_node_config SEC(".maps");

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define L4_OFF (ETH_HLEN + sizeof(struct iphdr))

enum verdict { NOT_A_SERVICE, TRANSLATED, NO_ENDPOINT };

/* Picks the endpoint and source of a new flow `in`, and remembers both directions. */
static __always_inline enum verdict new_flow(const struct ferry_flow4 *in, struct ferry_flow4 *out)
{
	struct ferry_svc_key skey = {};
	skey.ip[2] = bpf_htonl(0xffff);
	skey.ip[3] = in->daddr;
	skey.port = in->dport;
	skey.proto = in->proto;
	skey.scope = FERRY_SCOPE_OUTSIDE;
	struct ferry_svc *svc = bpf_map_lookup_elem(&ferry_services, &skey);
	if (!svc)
		return NOT_A_SERVICE;
	if (svc->count == 0)
		return NO_ENDPOINT;
	struct ferry_backend_key bkey = { .svc_id = svc->id,
					  .slot = bpf_get_prandom_u32() % svc->count };
	struct ferry_sockaddr *be = bpf_map_lookup_elem(&ferry_backends, &bkey);
	if (!be || !is_v4_mapped(be->ip))
		return NO_ENDPOINT;

	out->saddr = in->saddr;
	out->daddr = be->ip[3];
	out->sport = in->sport;
	out->dport = be->port;
	out->proto = in->proto;
	if (!(svc->flags & FERRY_SVC_KEEP_SOURCE)) {
		__u32 zero = 0;
		struct ferry_node_config *cfg = bpf_map_lookup_elem(&ferry_node_config, &zero);
		/* Without an address to SNAT to, replies could not find their way back. */
		if (!cfg || !cfg->snat_ip4)
			return NO_ENDPOINT;
		out->saddr = cfg->snat_ip4;
		int found = 0;
		for (int i = 0; i < SNAT_PORT_TRIES; i++) {
			__u16 port = bpf_htons(SNAT_PORT_MIN + bpf_get_prandom_u32() % SNAT_PORT_COUNT);
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
	struct ferry_flow4 reply_to = { .saddr = in->daddr, .daddr = in->saddr, .sport = in->dport,
					.dport = in->sport, .proto = in->proto };
	/* NOEXIST: two first packets racing for one port; the loser drops, TCP retries. */
	if (bpf_map_update_elem(&ferry_nat4, &reply, &reply_to, BPF_NOEXIST))
		return NO_ENDPOINT;
	bpf_map_update_elem(&ferry_nat4, in, out, BPF_ANY);
	return TRANSLATED;
}

/* Rewrites addresses and ports from `from` to `to`, keeping the IP and L4 checksums. */
static __always_inline void rewrite(struct __sk_buff *skb, const struct ferry_flow4 *from,
				    const struct ferry_flow4 *to)
{
	__u32 csum_off = L4_OFF + (from->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							      : offsetof(struct udphdr, check));
	/* A UDP checksum of 0 means "none" and must stay 0. */
	__u64 mangled0 = from->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (from->saddr != to->saddr) {
		bpf_l4_csum_replace(skb, csum_off, from->saddr, to->saddr,
				    mangled0 | BPF_F_PSEUDO_HDR | 4);
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, from->saddr, to->saddr, 4);
		bpf_skb_store_bytes(skb, IP_SRC_OFF, &to->saddr, 4, 0);
	}
	if (from->daddr != to->daddr) {
		bpf_l4_csum_replace(skb, csum_off, from->daddr, to->daddr,
				    mangled0 | BPF_F_PSEUDO_HDR | 4);
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, from->daddr, to->daddr, 4);
		bpf_skb_store_bytes(skb, IP_DST_OFF, &to->daddr, 4, 0);
	}
	if (from->sport != to->sport) {
		bpf_l4_csum_replace(skb, csum_off, from->sport, to->sport, mangled0 | 2);
		bpf_skb_store_bytes(skb, L4_OFF, &to->sport, 2, 0);
	}
	if (from->dport != to->dport) {
		bpf_l4_csum_replace(skb, csum_off, from->dport, to->dport, mangled0 | 2);
		bpf_skb_store_bytes(skb, L4_OFF + 2, &to->dport, 2, 0);
	}
}

SEC("classifier")
int ferry_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
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
	struct ferry_flow4 to;
	struct ferry_flow4 *known = bpf_map_lookup_elem(&ferry_nat4, &key);
	if (known) {
		to = *known;
	} else {
		switch (new_flow(&key, &to)) {
		case NOT_A_SERVICE:
			return TC_ACT_OK;
		case NO_ENDPOINT:
			return TC_ACT_SHOT;
		case TRANSLATED:
			break;
		}
	}
	rewrite(skb, &key, &to);
	return TC_ACT_OK;
}
