/* The workloads of `cargo xtask bench` (xtask/src/bench/), one program with modes.
 *
 *   workloads MODE N       run workload MODE with size N, then print one line:
 *                          "elapsed_ns=<ns> ops=<n>" (the timed part only, not process start-up)
 *   workloads fork-noexec-for SECONDS FORKERS
 *                          the sustained fork storm: FORKERS multithreaded processes fork children
 *                          that exit at once, for SECONDS; the bench runs it from a statically
 *                          linked copy (fewer mappings to copy per fork: ~40 % more forks a second)
 *   workloads worker       the lingering workers of the server-host condition: a threaded master
 *                          (3 threads besides the main one) forks WORKERS workers that neither
 *                          exec nor exit, as a gunicorn, Puma or unicorn master does, each with a
 *                          pool of POOL_THREADS idle threads asleep on a condition variable (a
 *                          futex wait), as a threaded worker's are; all stay until this process's
 *                          stdin closes
 *   workloads latency      a multithreaded fork whose child never execs and one whose child exits
 *                          without exec, with the wall-clock times to measure finding latency
 *
 * Modes: cheap, futex, tcp, pipe, fork-exec, fork-noexec, threads (workloads 0-6 of the bench).
 *
 * Two-party workloads use threads (tcp) or fork + exec (pipe: the reader is this program
 * re-executed), never fork without exec: a child that runs on without exec makes a fork family,
 * which the daemon answers by attaching its syscall write probe, and that would measure something
 * else (the bench measures that case on purpose, in its server-host condition, with `worker`).
 *
 * The ping-pong workloads (tcp, pipe, threads: each step waits for the other party) run on one
 * CPU, the last this process may use, with every party on it. Left to the scheduler on the 2-vCPU
 * development VM, each step's cross-CPU wakeup (an IPI to a halted vCPU, through the hypervisor)
 * cost more than the work itself and the placement at start picked the run's speed: tcp took
 * 4.3 s unpinned and 1.1 s pinned, threads 1.34 s and 0.83 s, and the pipe ran in 1.1, 2.8 or
 * 4.2 s by placement alone (bench runs 14-18: ±143 % between paired samples). Pinned, the same
 * runs spread by 1-3 %, and what a monitor adds to each step (every hook runs in the calling
 * task) is a larger, more honest share of it: on a real host's cheaper wakeups it is the
 * larger share too.
 *
 * Built by the bench with `cc -O2 -pthread`, and with `-static` for the sustained storm.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PIPE_CHUNK 4096
#define TCP_MESSAGE 64

static void die(const char *what) {
    perror(what);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void report(uint64_t start, uint64_t ops) {
    printf("elapsed_ns=%llu ops=%llu\n", (unsigned long long)(now_ns() - start),
           (unsigned long long)ops);
}

/* Pins this process (and the threads and children it makes later) to the last CPU it may use
 * (see the top of this file). */
static void pin_to_one_cpu(void) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed)) die("sched_getaffinity");
    for (int cpu = CPU_SETSIZE - 1; cpu >= 0; cpu--) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        if (sched_setaffinity(0, sizeof one, &one)) die("sched_setaffinity");
        return;
    }
    fprintf(stderr, "no CPU in this process's affinity mask\n");
    exit(1);
}

/* Threads that only exist, so that a fork comes from a multithreaded process. */
static void *idle_thread(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

static void start_idle_threads(int count) {
    for (int i = 0; i < count; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, idle_thread, NULL)) die("pthread_create");
    }
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* 0: cheap syscalls. */
static void cheap(long n) {
    int fd = open("/dev/null", O_WRONLY);
    if (fd < 0) die("/dev/null");
    char byte = 'x';
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        if (write(fd, &byte, 1) != 1) die("write");
        (void)syscall(SYS_getppid); /* the raw syscall: glibc never caches it, but be explicit */
    }
    report(start, (uint64_t)n * 2);
}

/* 1: futex contention, 4 threads on one mutex. */
static pthread_mutex_t contended = PTHREAD_MUTEX_INITIALIZER;
static volatile uint64_t shared_counter;

static void *contend(void *arg) {
    long n = (long)arg;
    for (long i = 0; i < n; i++) {
        pthread_mutex_lock(&contended);
        shared_counter++;
        /* Give the CPU away while holding the lock now and then, as a preempted holder would:
         * the other threads then find it taken and sleep in futex(FUTEX_WAIT), and the unlock
         * wakes one (FUTEX_WAKE). Without this, on 2 cores the lock is rarely contended. */
        if ((i & 3) == 0) sched_yield();
        pthread_mutex_unlock(&contended);
        for (volatile int spin = 0; spin < 50; spin++) {
        }
    }
    return NULL;
}

static void futex_contention(long n) {
    enum { THREADS = 4 };
    pthread_t threads[THREADS];
    uint64_t start = now_ns();
    for (int i = 0; i < THREADS; i++)
        if (pthread_create(&threads[i], NULL, contend, (void *)(n / THREADS))) die("pthread_create");
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    report(start, shared_counter);
}

/* 2: loopback TCP ping-pong over one connection. */
static void *tcp_echo(void *arg) {
    int listener = (int)(intptr_t)arg;
    int conn = accept(listener, NULL, NULL);
    if (conn < 0) die("accept");
    int one = 1;
    setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char buf[TCP_MESSAGE];
    for (;;) {
        if (read_all(conn, buf, sizeof buf)) break;
        if (write_all(conn, buf, sizeof buf)) break;
    }
    close(conn);
    return NULL;
}

static void tcp_ping_pong(long n) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr)) die("bind");
    if (listen(listener, 1)) die("listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len)) die("getsockname");
    pthread_t server;
    if (pthread_create(&server, NULL, tcp_echo, (void *)(intptr_t)listener)) die("pthread_create");
    int conn = socket(AF_INET, SOCK_STREAM, 0);
    if (conn < 0) die("socket");
    if (connect(conn, (struct sockaddr *)&addr, sizeof addr)) die("connect");
    int one = 1;
    setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char buf[TCP_MESSAGE];
    memset(buf, 'p', sizeof buf);
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        /* send/recv: sendto/recvfrom underneath, the socket calls a monitor would watch. */
        if (send(conn, buf, sizeof buf, 0) != (ssize_t)sizeof buf) die("send");
        size_t got = 0;
        while (got < sizeof buf) {
            ssize_t r = recv(conn, buf + got, sizeof buf - got, 0);
            if (r <= 0) die("recv");
            got += (size_t)r;
        }
    }
    report(start, (uint64_t)n);
    close(conn);
    pthread_join(server, NULL);
    close(listener);
}

/* 3: pipe throughput between two processes; the reader is this program, exec'd. */
static void pipe_reader(int fd) {
    static char buf[PIPE_CHUNK];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
    }
    exit(0);
}

static void pipe_throughput(long n) {
    int fds[2];
    if (pipe(fds)) die("pipe");
    pid_t reader = fork();
    if (reader < 0) die("fork");
    if (reader == 0) {
        close(fds[1]);
        char fd_text[16];
        snprintf(fd_text, sizeof fd_text, "%d", fds[0]);
        execl("/proc/self/exe", "workloads", "pipe-reader", fd_text, (char *)NULL);
        _exit(127);
    }
    close(fds[0]);
    static char buf[PIPE_CHUNK];
    memset(buf, 'w', sizeof buf);
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++)
        if (write_all(fds[1], buf, sizeof buf)) die("write");
    close(fds[1]);
    int status;
    waitpid(reader, &status, 0);
    report(start, (uint64_t)n);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "pipe reader failed\n");
        exit(1);
    }
}

/* 4 and 5: fork storms from a multithreaded parent. */
static void fork_storm(long n, int exec_true) {
    start_idle_threads(3);
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        pid_t child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            if (exec_true) {
                execl("/bin/true", "true", (char *)NULL);
                _exit(127);
            }
            _exit(0);
        }
        int status;
        if (waitpid(child, &status, 0) < 0) die("waitpid");
        if (!WIFEXITED(status) || WEXITSTATUS(status)) {
            fprintf(stderr, "child failed: status %d\n", status);
            exit(1);
        }
    }
    report(start, (uint64_t)n);
}

/* 5, sustained: FORKERS processes, each multithreaded (an idle thread and a forking one), fork
 * children that exit at once, for SECONDS. Separate processes, because threads of one process
 * that fork at once serialize on its memory map; raw clone(SIGCHLD) instead of fork(), because
 * glibc's fork also runs the atfork handlers and takes the allocator's and stdio's locks (a
 * third of the rate here); the kernel reaps the children (SIGCHLD ignored), so a forker never
 * waits for its child to be scheduled. Measured on 2 vCPUs without a monitor: one process
 * ~17,000 forks/s, two ~22,000 (glibc fork() and waitpid: ~7,000). */
static atomic_int stop_forking;

static void *forker(void *arg) {
    atomic_ullong *done = arg;
    while (!atomic_load_explicit(&stop_forking, memory_order_relaxed)) {
        long child = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
        if (child < 0) {
            if (errno == EAGAIN) continue;
            die("clone");
        }
        if (child == 0) syscall(SYS_exit_group, 0);
        atomic_fetch_add_explicit(done, 1, memory_order_relaxed);
    }
    return NULL;
}

static void sleep_for(double seconds) {
    struct timespec ts = {.tv_sec = (time_t)seconds,
                          .tv_nsec = (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

static void fork_noexec_for(double seconds, int forkers) {
    if (forkers < 1 || forkers > 64) forkers = 2;
    /* One counter per forking process, shared with this one. */
    atomic_ullong *done = mmap(NULL, 64 * sizeof *done, PROT_READ | PROT_WRITE,
                               MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (done == MAP_FAILED) die("mmap");
    pid_t procs[64];
    uint64_t start = now_ns();
    for (int i = 0; i < forkers; i++) {
        procs[i] = fork();
        if (procs[i] < 0) die("fork");
        if (procs[i] == 0) {
            signal(SIGCHLD, SIG_IGN);
            start_idle_threads(1);
            pthread_t t;
            if (pthread_create(&t, NULL, forker, &done[i])) die("pthread_create");
            sleep_for(seconds);
            atomic_store(&stop_forking, 1);
            pthread_join(t, NULL);
            _exit(0);
        }
    }
    int failed = 0;
    uint64_t total = 0;
    for (int i = 0; i < forkers; i++) {
        int status;
        if (waitpid(procs[i], &status, 0) != procs[i] || !WIFEXITED(status) || WEXITSTATUS(status))
            failed = 1;
        total += atomic_load(&done[i]);
    }
    if (failed) {
        fprintf(stderr, "a forking process failed\n");
        exit(1);
    }
    report(start, total);
}

/* 6: thread create/join storm. */
static void *nothing(void *arg) { return arg; }

static void thread_storm(long n) {
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, nothing, NULL)) die("pthread_create");
        pthread_join(t, NULL);
    }
    report(start, (uint64_t)n);
}

/* The server host's workers and their idle threads (see the top of this file). */
#define WORKERS 4
#define POOL_THREADS 8

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER;

/* An idle thread of a worker's pool: waits for work that never comes. */
static void *pool_thread(void *arg) {
    (void)arg;
    pthread_mutex_lock(&pool_lock);
    for (;;) pthread_cond_wait(&pool_work, &pool_lock);
    return NULL;
}

/* Forks a child that neither execs nor exits, with `pool` idle threads of its own; it dies with
 * this process. */
static pid_t fork_lingering_child(int pool) {
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(0);
        for (int i = 0; i < pool; i++) {
            pthread_t t;
            if (pthread_create(&t, NULL, pool_thread, NULL)) die("pthread_create");
        }
        for (;;) pause();
    }
    return child;
}

/* Waits until stdin closes (the bench is done with us), then ends the `count` children. */
static void end_with_stdin(const pid_t *children, int count) {
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    for (int i = 0; i < count; i++) kill(children[i], SIGKILL);
    for (int i = 0; i < count; i++) waitpid(children[i], NULL, 0);
}

/* A threaded master and its workers, forked without exec: they live until the master goes
 * (long-lived fork family members whose parent is multithreaded). */
static void worker(void) {
    start_idle_threads(3);
    pid_t children[WORKERS];
    for (int i = 0; i < WORKERS; i++) children[i] = fork_lingering_child(POOL_THREADS);
    printf("worker child=%d workers=%d threads=%d\n", (int)children[0], WORKERS,
           POOL_THREADS);
    fflush(stdout);
    end_with_stdin(children, WORKERS);
}

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Finding latency: a multithreaded parent forks one child that never execs (the daemon reports
 * it at the exec-grace deadline) and one that _exit()s without exec after 50 ms (reported at its
 * exit). Prints the children and the wall-clock times (CLOCK_REALTIME ns) of the first fork
 * and of the second child's exit, then keeps the first child until stdin closes. */
static void latency(void) {
    start_idle_threads(1);
    uint64_t fork_ns = realtime_ns();
    pid_t waiting = fork_lingering_child(0);
    pid_t exiting = fork();
    if (exiting < 0) die("fork");
    if (exiting == 0) {
        usleep(50000);
        _exit(0);
    }
    if (waitpid(exiting, NULL, 0) != exiting) die("waitpid");
    uint64_t exit_ns = realtime_ns();
    printf("latency deadline_child=%d fork_ns=%llu exit_child=%d exit_ns=%llu\n", (int)waiting,
           (unsigned long long)fork_ns, (int)exiting, (unsigned long long)exit_ns);
    fflush(stdout);
    end_with_stdin(&waiting, 1);
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "pipe-reader")) pipe_reader(atoi(argv[2]));
    if (argc >= 2 && !strcmp(argv[1], "latency")) {
        latency();
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "worker")) {
        worker();
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "fork-noexec-for")) {
        fork_noexec_for(atof(argv[2]), atoi(argv[3]));
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr,
                "usage: %s cheap|futex|tcp|pipe|fork-exec|fork-noexec|threads N\n"
                "       %s fork-noexec-for SECONDS FORKERS\n"
                "       %s worker|latency\n",
                argv[0], argv[0], argv[0]);
        return 2;
    }
    long n = atol(argv[2]);
    const char *mode = argv[1];
    /* The ping-pong workloads, on one CPU (see the top of this file). */
    if (!strcmp(mode, "tcp") || !strcmp(mode, "pipe") || !strcmp(mode, "threads")) pin_to_one_cpu();
    if (!strcmp(mode, "cheap")) cheap(n);
    else if (!strcmp(mode, "futex")) futex_contention(n);
    else if (!strcmp(mode, "tcp")) tcp_ping_pong(n);
    else if (!strcmp(mode, "pipe")) pipe_throughput(n);
    else if (!strcmp(mode, "fork-exec")) fork_storm(n, 1);
    else if (!strcmp(mode, "fork-noexec")) fork_storm(n, 0);
    else if (!strcmp(mode, "threads")) thread_storm(n);
    else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
