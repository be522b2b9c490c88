/* sockaddr.h: the one address parser the benchmarks' C helpers share. */
#ifndef STEERD_BENCH_SOCKADDR_H
#define STEERD_BENCH_SOCKADDR_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* Fill *addr with DST (IPv4 or IPv6 literal) and PORT; returns the address length, 0 if DST
 * is not an address. */
static inline socklen_t bench_sockaddr(const char *dst, int port, struct sockaddr_storage *addr)
{
    memset(addr, 0, sizeof(*addr));
    if (strchr(dst, ':')) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)addr;

        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        return inet_pton(AF_INET6, dst, &a6->sin6_addr) == 1 ? sizeof(*a6) : 0;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)addr;

    a4->sin_family = AF_INET;
    a4->sin_port = htons(port);
    return inet_pton(AF_INET, dst, &a4->sin_addr) == 1 ? sizeof(*a4) : 0;
}

#endif
