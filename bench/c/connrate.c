/* bench/c/connrate: open TCP connections to ADDR, ports LO..HI in turn, CONC at a time, for SECONDS or until
 * MAX connections are made, whichever comes first; each is closed as soon as it is established (with a reset,
 * so no TIME_WAIT piles up). Prints one JSON line: {"ok": N, "failed": N, "seconds": S, "rate": N/S}.
 * usage: connrate ADDR LO HI CONC SECONDS MAX */
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

static struct sockaddr_in target;
static int lo, hi, next_port;
static long ok, failed, started;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void finish(int fd, int good) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
    if (good) ok++; else failed++;
}

static int start(int ep) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    target.sin_port = htons(next_port);
    next_port = next_port >= hi ? lo : next_port + 1;
    started++;
    if (connect(s, (struct sockaddr *)&target, sizeof target) == 0) { finish(s, 1); return 0; }
    if (errno != EINPROGRESS) { finish(s, 0); return 0; }
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 7) { fprintf(stderr, "usage: connrate ADDR LO HI CONC SECONDS MAX\n"); return 64; }
    target.sin_family = AF_INET;
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 64; }
    lo = next_port = atoi(argv[2]);
    hi = atoi(argv[3]);
    int conc = atoi(argv[4]);
    double seconds = atof(argv[5]);
    long max = atol(argv[6]);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    double t0 = now(), end = t0 + seconds;
    int inflight = 0;
    struct epoll_event evs[256];
    while (inflight < conc && started < max) inflight += start(ep) > 0;
    while (inflight > 0) {
        int n = epoll_wait(ep, evs, 256, 200);
        double t = now();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd, err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            finish(fd, err == 0);
            inflight--;
        }
        if (n == 0 && t > end + 5) break;  /* stuck connections: give up on them */
        while (t < end && inflight < conc && started < max) {
            int r = start(ep);
            if (r < 0) break;
            inflight += r;
        }
    }
    double took = now() - t0;
    printf("{\"ok\": %ld, \"failed\": %ld, \"seconds\": %.4f, \"rate\": %.1f}\n", ok, failed, took, ok / took);
    return 0;
}
