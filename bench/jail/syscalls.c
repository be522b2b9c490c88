/* syscalls.c: nanoseconds per call of getppid() and of setsockopt(SO_RCVBUF) on FD, in a
 * tight loop (bench/jail/run.py builds it with gcc and runs it with and without the jail).
 *
 *     syscalls N FD   ->  prints "getppid NS\nsetsockopt NS\n"
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int fd = argc > 2 ? atoi(argv[2]) : 3;
    int value = 1 << 20;
    double t0, t1;

    t0 = now();
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    t1 = now();
    printf("getppid %.1f\n", (t1 - t0) / n);
    t0 = now();
    for (long i = 0; i < n; i++)
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &value, sizeof(value)) != 0) {
            perror("setsockopt");
            return 1;
        }
    t1 = now();
    printf("setsockopt %.1f\n", (t1 - t0) / n);
    return 0;
}
