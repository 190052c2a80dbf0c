/* A tiny HTTP/1.1 server for the packet-path benchmark: every connection gets one
 * fixed "200 ok" and is closed by the server.  C so that the guest side is not the
 * bottleneck of a NEW-connections-per-second measurement on 2 cores.
 * usage: httpd PORT WORKERS   (prints "ready" once listening; runs until killed)
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char reply[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok\n";

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 8000;
    int workers = argc > 2 ? atoi(argv[2]) : 2;
    int one = 1;
    struct sockaddr_in a;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    if (listen(s, 4096) < 0) { perror("listen"); return 1; }
    signal(SIGPIPE, SIG_IGN);
    printf("ready\n");
    fflush(stdout);
    for (int w = 1; w < workers; w++)
        if (fork() == 0) break;
    char buf[4096];
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        /* read the request (one segment is enough for wrk's GET) so close() sends FIN, not RST */
        if (recv(c, buf, sizeof buf, 0) > 0)
            (void)!send(c, reply, sizeof reply - 1, MSG_NOSIGNAL);
        close(c);
    }
}
