/* compat.c: the socket jail's 32-bit entry. A raw tracepoint on sys_enter that kills a process
 * making a 32-bit setsockopt outside the allowlist on a service socket.
 *
 * Why: the kernel runs the cgroup setsockopt hook (jail.c) only for native calls
 * (do_sock_setsockopt skips it when the call is compat), so a 64-bit process issuing
 * `int $0x80` with i386 setsockopt (366) or socketcall(SYS_SETSOCKOPT) (102) could clear
 * SO_REUSEPORT or detach the group's program on a socket it holds. BPF LSM, which could
 * refuse the call, does not load on this machine class; kprobes are absent; a raw tracepoint
 * loads and sees the compat call, but cannot refuse it: the call still runs. So this program
 * kills the caller (bpf_send_signal(SIGKILL) at syscall entry: it never runs another
 * instruction of its own) and records it in `jail_offences` for the daemon, whose watchdog
 * repairs the socket within its period and evicts the offender's app.
 *
 * Which socket: the descriptor is followed through the caller's fd table to its struct sock
 * (task -> files -> fdt -> fd[] -> file -> inode mode S_IFSOCK -> socket -> sk), with the
 * running kernel's member offsets from its BTF (-D STEERD_OFF_*, steerd/daemon/dataplane/btf.py),
 * never the build headers'. Only a UDP socket bound to the service port in the daemon's
 * network namespace counts; every other 32-bit call passes untouched.
 *
 * -D flags (steerd/daemon/dataplane/jail.py): STEERD_JAIL_PORT, STEERD_JAIL_NETNS,
 * STEERD_FD_JAIL_OPTIONS, STEERD_FD_JAIL_OFFENCES, STEERD_FD_COUNTERS, STEERD_OFF_*.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "steerd.h"

#define JAIL_OPTIONS ((void *)bpf_pseudo_fd(1, STEERD_FD_JAIL_OPTIONS))
#define JAIL_OFFENCES ((void *)bpf_pseudo_fd(1, STEERD_FD_JAIL_OFFENCES))

#define TS_COMPAT_ 0x0002        /* arch/x86/include/asm/thread_info.h */
#define NR_I386_SOCKETCALL 102
#define NR_I386_SETSOCKOPT 366
#define SYS_SETSOCKOPT_ 14       /* socketcall's call number (include/uapi/linux/net.h) */
#define S_IFMT_ 0170000
#define S_IFSOCK_ 0140000
#define SIGKILL_ 9

struct offence {
    __u32 uid;
    __u32 level;
    __u32 optname;
    __u32 count;
};

/* Reads a kernel word at base + off; 0 when unreadable. */
static __always_inline __u64 read_u64(__u64 base, __u32 off)
{
    __u64 v = 0;

    if (bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off)) != 0)
        return 0;
    return v;
}

static __always_inline __u32 read_u32(__u64 base, __u32 off)
{
    __u32 v = 0;

    bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

static __always_inline __u16 read_u16(__u64 base, __u32 off)
{
    __u16 v = 0;

    bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

/* 1: fd is a service socket; 0: it is not; -1: the walk failed. */
static __always_inline int service_socket(__u64 task, __u32 fd)
{
    __u64 files, fdt, array, file, inode, sock, sk, net;

    files = read_u64(task, STEERD_OFF_TASK_FILES);
    fdt = files ? read_u64(files, STEERD_OFF_FILES_FDT) : 0;
    if (!fdt)
        return -1;
    if (fd >= read_u32(fdt, STEERD_OFF_FDT_MAX_FDS))
        return 0;  /* not an open descriptor: the call fails with EBADF anyway */
    array = read_u64(fdt, STEERD_OFF_FDT_FD);
    file = array ? read_u64(array, fd * 8) : 0;
    if (!file)
        return 0;
    inode = read_u64(file, STEERD_OFF_FILE_INODE);
    if (!inode)
        return -1;
    if ((read_u16(inode, STEERD_OFF_INODE_MODE) & S_IFMT_) != S_IFSOCK_)
        return 0;
    sock = read_u64(file, STEERD_OFF_FILE_PRIVATE);
    sk = sock ? read_u64(sock, STEERD_OFF_SOCKET_SK) : 0;
    if (!sk)
        return 0;  /* a socket being torn down */
    if (read_u16(sk, STEERD_OFF_SK_PROTOCOL) != IPPROTO_UDP ||
        read_u16(sk, STEERD_OFF_SK_NUM) != STEERD_JAIL_PORT)
        return 0;
    net = read_u64(sk, STEERD_OFF_SK_NET);
    if (!net)
        return -1;
    return read_u64(net, STEERD_OFF_NET_COOKIE) == STEERD_JAIL_NETNS;
}

int steerd_jail_compat(struct bpf_raw_tracepoint_args *ctx)
{
    long nr = (long)ctx->args[1];
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    __u64 task, ip = (__u64)regs;
    __u32 fd, level, optname, optval, args[5];
    __u32 *verdict;
    __u64 key;
    int found;

    if (nr != NR_I386_SETSOCKOPT && nr != NR_I386_SOCKETCALL)
        return 0;
    task = bpf_get_current_task();
    if (!(read_u32(task, STEERD_OFF_TASK_STATUS) & TS_COMPAT_))
        return 0;  /* a native syscall with that number (102 is getuid on x86-64) */
    /* i386 syscall arguments: ebx, ecx, edx, esi, edi. */
    if (nr == NR_I386_SETSOCKOPT) {
        fd = (__u32)read_u64(ip, STEERD_OFF_REGS_BX);
        level = (__u32)read_u64(ip, STEERD_OFF_REGS_CX);
        optname = (__u32)read_u64(ip, STEERD_OFF_REGS_DX);
        optval = (__u32)read_u64(ip, STEERD_OFF_REGS_SI);
    } else {
        if ((__u32)read_u64(ip, STEERD_OFF_REGS_BX) != SYS_SETSOCKOPT_)
            return 0;
        if (bpf_probe_read_user(args, sizeof(args),
                                (void *)(__u64)(__u32)read_u64(ip, STEERD_OFF_REGS_CX)) != 0)
            return 0;  /* unreadable arguments: the call fails with EFAULT */
        fd = args[0];
        level = args[1];
        optname = args[2];
        optval = args[3];
    }
    found = service_socket(task, fd);
    if (found == 0)
        return 0;
    if (found < 0) {
        steerd_count(STEERD_CNT_JAIL_COMPAT_UNREADABLE);
        return 0;
    }
    key = steerd_jail_option_key(level, optname);
    verdict = bpf_map_lookup_elem(JAIL_OPTIONS, &key);
    if (verdict && *verdict == STEERD_JAIL_ALLOW)
        return 0;
    if (verdict && *verdict == STEERD_JAIL_ON_ONLY) {
        int value = 0;

        if (bpf_probe_read_user(&value, sizeof(value), (void *)(__u64)optval) == 0 && value)
            return 0;  /* setting it on changes nothing: the daemon set it */
    }
    {
        __u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct offence fresh = {
            .uid = (__u32)bpf_get_current_uid_gid(),
            .level = level,
            .optname = optname,
            .count = 1,
        };
        struct offence *seen = bpf_map_lookup_elem(JAIL_OFFENCES, &tgid);

        if (seen)
            __sync_fetch_and_add(&seen->count, 1);
        else
            bpf_map_update_elem(JAIL_OFFENCES, &tgid, &fresh, BPF_NOEXIST);
    }
    steerd_count(STEERD_CNT_JAIL_KILLED_COMPAT);
    bpf_send_signal(SIGKILL_);
    return 0;
}
