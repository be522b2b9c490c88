/* setsockopt32.c: a real 32-bit program (gcc -m32) that sets one socket option on a descriptor
 * it inherited, the way a 32-bit tenant would: through glibc's setsockopt (i386 syscall 366)
 * or the older socketcall(SYS_SETSOCKOPT) entry.
 *
 *     setsockopt32 FD OPTNAME VALUE [socketcall]   (level SOL_SOCKET)
 * Exit 0 if the call succeeded, 2 if it failed; SIGKILL if the socket jail's compat hook
 * killed it (tests/dataplane/test_jail.py).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int fd, optname, value, ret;

    if (argc < 4)
        return 64;
    fd = atoi(argv[1]);
    optname = atoi(argv[2]);
    value = atoi(argv[3]);
    if (argc > 4 && strcmp(argv[4], "socketcall") == 0) {
        unsigned long args[5] = {fd, SOL_SOCKET, optname, (unsigned long)&value, sizeof(value)};

        ret = syscall(SYS_socketcall, 14 /* SYS_SETSOCKOPT */, args);
    } else {
        ret = setsockopt(fd, SOL_SOCKET, optname, &value, sizeof(value));
    }
    return ret == 0 ? 0 : 2;
}
