/* bench/c/connsrv: accept TCP connections on ADDR, ports LO..HI, and close each at once. For bench/datapath's
 * new-connection rate: a server far faster than the client path it measures. Runs until killed or DEADLINE
 * seconds pass (a bound, so it can never outlive a benchmark that forgot it).
 * usage: connsrv ADDR LO HI DEADLINE */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: connsrv ADDR LO HI DEADLINE\n"); return 64; }
    int lo = atoi(argv[2]), hi = atoi(argv[3]);
    double deadline = atof(argv[4]);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int port = lo; port <= hi; port++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 64; }
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) { perror("bind/listen"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    }
    printf("ready\n");
    fflush(stdout);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, 1000);
        for (int i = 0; i < n; i++) {
            for (;;) {
                int c = accept4(evs[i].data.fd, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0) break;
                close(c);
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9 > deadline) return 0;
    }
}
