/* jail.c: cgroup hooks that keep every socket steerd hands out a socket, not a key to the port.
 *
 * Why: the kernel checks no permission when the holder of ANY member socket of a reuseport
 * group attaches or detaches the group's program (SO_ATTACH_REUSEPORT_CBPF/EBPF,
 * SO_DETACH_REUSEPORT_BPF); clearing SO_REUSEPORT makes a member win every lookup on the
 * port, connect() takes a member out of the group with a 4-tuple that wins every lookup,
 * SO_BINDTODEVICE rehashes it out, and a fresh bind to the port (same uid as the group) joins
 * it. Every app holds real member sockets, so each of these would let one tenant take the
 * port from the others. These programs run for every process of the machine (attached with
 * BPF_F_ALLOW_MULTI at the root of the cgroup v2 hierarchy), and for a UDP socket on the
 * service port in the daemon's network namespace, for every process outside the daemon's
 * own cgroup (listed by id in `jail_cgroups`):
 *   - setsockopt: only the options of the allowlist `jail_options` (filled by
 *     steerd/daemon/dataplane/jail.py from its ALLOWED_OPTIONS table) pass; SO_REUSEADDR and
 *     SO_REUSEPORT set to a non-zero value are answered as done without reaching the kernel
 *     (stock servers set them on the socket they are given); everything else is refused;
 *   - connect() and bind() on such a socket are refused.
 * Anything else passes untouched: other ports, TCP on the same port, other namespaces.
 * The 32-bit entry skips the setsockopt hook (the kernel runs it only for native calls):
 * compat.c covers that path with the same allowlist.
 *
 * -D flags (steerd/daemon/dataplane/jail.py): STEERD_JAIL_PORT, STEERD_JAIL_NETNS (the daemon's
 * network namespace cookie), STEERD_FD_JAIL_CGROUPS, STEERD_FD_JAIL_OPTIONS, STEERD_FD_COUNTERS.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "steerd.h"

#define JAIL_CGROUPS ((void *)bpf_pseudo_fd(1, STEERD_FD_JAIL_CGROUPS))
#define JAIL_OPTIONS ((void *)bpf_pseudo_fd(1, STEERD_FD_JAIL_OPTIONS))

#define PAGE_SIZE_ 4096

#define REFUSE 0
#define ALLOW 1

/* The daemon by its cgroup, not its pid: a pid can be reused after a SIGKILL and means
 * another process in another pid namespace; the daemon's cgroup is entered only by
 * writing its cgroup.procs, which only root can. */
static __always_inline int is_daemon(void)
{
    __u64 cgroup = bpf_get_current_cgroup_id();

    return bpf_map_lookup_elem(JAIL_CGROUPS, &cgroup) != NULL;
}

/* A UDP socket bound to the service port, in the daemon's network namespace. */
static __always_inline int is_service_socket(struct bpf_sock *sk, __u64 netns)
{
    return sk && sk->protocol == IPPROTO_UDP && sk->src_port == STEERD_JAIL_PORT &&
           netns == STEERD_JAIL_NETNS;
}

int steerd_jail_setsockopt(struct bpf_sockopt *ctx)
{
    __u64 key = steerd_jail_option_key(ctx->level, ctx->optname);
    __u32 *verdict;

    if (!is_service_socket(ctx->sk, bpf_get_netns_cookie(ctx)) || is_daemon())
        goto pass;
    verdict = bpf_map_lookup_elem(JAIL_OPTIONS, &key);
    if (verdict && *verdict == STEERD_JAIL_ALLOW)
        goto pass;
    if (verdict && *verdict == STEERD_JAIL_ON_ONLY) {
        int *value = ctx->optval;

        if ((void *)(value + 1) <= ctx->optval_end && *value != 0) {
            /* -1: the kernel's handler is skipped and the caller told "done". */
            ctx->optlen = -1;
            steerd_count(STEERD_CNT_JAIL_NOOP_SETSOCKOPT);
            return ALLOW;
        }
    }
    steerd_count(STEERD_CNT_JAIL_REFUSED_SETSOCKOPT);
    return REFUSE;
pass:
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
