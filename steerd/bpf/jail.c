/* jail.c: cgroup hooks that keep every socket steerd hands out a socket, not a key to the port.
 *
 * Why: the kernel checks no permission when the holder of ANY member socket of a reuseport
 * group attaches or detaches the group's program (SO_ATTACH_REUSEPORT_CBPF/EBPF,
 * SO_DETACH_REUSEPORT_BPF); connect() takes a member out of the group with a 4-tuple that
 * wins every lookup, SO_BINDTODEVICE rehashes it out, and a fresh bind to the port (same
 * uid as the group) joins it. Every app holds real member sockets, so each of these would
 * let one tenant take the port from the others. These programs run for every process of
 * the machine (attached with BPF_F_ALLOW_MULTI at the root of the cgroup v2 hierarchy), and
 * for a UDP socket on the service port in the daemon's network namespace refuse (EPERM)
 * those calls to every process but the daemon's own (its main and classifier processes,
 * listed by tgid in `jail_pids`, which the daemon rewrites at every start). Anything else
 * passes untouched: other ports, TCP on the same port, other network namespaces.
 *
 * -D flags (steerd/daemon/dataplane/jail.py): STEERD_JAIL_PORT, STEERD_JAIL_NETNS (the daemon's
 * network namespace cookie), STEERD_FD_JAIL_PIDS, STEERD_FD_COUNTERS.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "steerd.h"

#define JAIL_PIDS ((void *)bpf_pseudo_fd(1, STEERD_FD_JAIL_PIDS))

#define SOL_SOCKET_ 1
#define SO_BINDTODEVICE_ 25
#define SO_ATTACH_REUSEPORT_CBPF_ 51
#define SO_ATTACH_REUSEPORT_EBPF_ 52
#define SO_DETACH_REUSEPORT_BPF_ 68
#define SO_BINDTOIFINDEX_ 62
#define PAGE_SIZE_ 4096

#define REFUSE 0
#define ALLOW 1

static __always_inline int is_daemon(void)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;

    return bpf_map_lookup_elem(JAIL_PIDS, &tgid) != NULL;
}

/* A UDP socket bound to the service port, in the daemon's network namespace. */
static __always_inline int is_service_socket(struct bpf_sock *sk, __u64 netns)
{
    return sk && sk->protocol == IPPROTO_UDP && sk->src_port == STEERD_JAIL_PORT &&
           netns == STEERD_JAIL_NETNS;
}

int steerd_jail_setsockopt(struct bpf_sockopt *ctx)
{
    int optname = ctx->optname;

    if (ctx->level == SOL_SOCKET_ &&
        (optname == SO_ATTACH_REUSEPORT_CBPF_ || optname == SO_ATTACH_REUSEPORT_EBPF_ ||
         optname == SO_DETACH_REUSEPORT_BPF_ || optname == SO_BINDTODEVICE_ ||
         optname == SO_BINDTOIFINDEX_) &&
        is_service_socket(ctx->sk, bpf_get_netns_cookie(ctx)) && !is_daemon()) {
        steerd_count(STEERD_CNT_JAIL_REFUSED_SETSOCKOPT);
        return REFUSE;
    }
    /* Options larger than a page reach the program truncated: let the kernel use the
     * caller's own buffer (Documentation/bpf/prog_cgroup_sockopt.rst). */
    if (ctx->optlen > PAGE_SIZE_)
        ctx->optlen = 0;
    return ALLOW;
}

static __always_inline int connect_hook(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP && is_service_socket(ctx->sk, bpf_get_netns_cookie(ctx)) &&
        !is_daemon()) {
        steerd_count(STEERD_CNT_JAIL_REFUSED_CONNECT);
        return REFUSE;
    }
    return ALLOW;
}

int steerd_jail_connect4(struct bpf_sock_addr *ctx)
{
    return connect_hook(ctx);
}

int steerd_jail_connect6(struct bpf_sock_addr *ctx)
{
    return connect_hook(ctx);
}

static __always_inline int bind_hook(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP && ctx->user_port == bpf_htons(STEERD_JAIL_PORT) &&
        bpf_get_netns_cookie(ctx) == STEERD_JAIL_NETNS && !is_daemon()) {
        steerd_count(STEERD_CNT_JAIL_REFUSED_BIND);
        return REFUSE;
    }
    return ALLOW;
}

int steerd_jail_bind4(struct bpf_sock_addr *ctx)
{
    return bind_hook(ctx);
}

int steerd_jail_bind6(struct bpf_sock_addr *ctx)
{
    return bind_hook(ctx);
}
