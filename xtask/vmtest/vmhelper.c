/*
 * Guest-side helpers for `cargo xtask vmtest`, built static and put in the initramfs. The guest
 * has only busybox, so what busybox cannot do is here.
 *
 *   vmhelper echo PORT        listen on 127.0.0.1:PORT and echo every connection (one process
 *                             per connection) in a process of its own: prints "listening pid=N"
 *                             once it accepts, and returns
 *   vmhelper fentry FUNC      load a do-nothing fentry program on kernel function FUNC and
 *   vmhelper fexit FUNC       attach it (then detach): prints "attached" and exits 0, or the
 *                             failing step, its errno and the verifier's log, and exits 1
 *   vmhelper capped CMD ARGS  run CMD as nobody (uid and gid 65534, no groups) with
 *                             CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE only, as ambient
 *                             capabilities (busybox's setpriv cannot change the uid); the
 *                             memlock limit raised first where it can be, as a unit's
 *                             LimitMEMLOCK would (kernels before 5.11 charge BPF maps to it)
 *
 * fentry/fexit are probed with raw bpf(2) rather than bpftool: the guest has no shared
 * libraries, and the question is only whether this kernel lets such a program load and attach.
 * The BTF id of FUNC comes from /sys/kernel/btf/vmlinux, parsed here.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/bpf.h>
#include <linux/btf.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int echo(int port) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 64)) {
        perror("echo: bind/listen");
        return 1;
    }
    /* Children are never waited for: let the kernel reap them. */
    signal(SIGCHLD, SIG_IGN);
    fflush(stdout);
    pid_t server = fork();
    if (server != 0) {
        /* The caller goes on; the server lives until killed or the guest powers off. */
        printf("listening pid=%d\n", (int)server);
        return server < 0;
    }
    setsid();
    /* Let go of the caller's stdout: a shell's $(...) waits until every writer has closed it. */
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    for (;;) {
        int conn = accept(listener, NULL, NULL);
        if (conn < 0)
            continue;
        if (fork() == 0) {
            char buf[4096];
            ssize_t n;
            while ((n = read(conn, buf, sizeof buf)) > 0)
                if (write(conn, buf, n) != n)
                    break;
            _exit(0);
        }
        close(conn);
    }
}

/* The BTF id of the FUNC named `name` in the kernel's BTF, or -1. */
static long btf_func_id(const char *name) {
    FILE *f = fopen("/sys/kernel/btf/vmlinux", "rb");
    if (!f) {
        perror("/sys/kernel/btf/vmlinux");
        return -1;
    }
    size_t cap = 1 << 20, len = 0;
    unsigned char *data = malloc(cap);
    size_t n;
    while ((n = fread(data + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap)
            data = realloc(data, cap *= 2);
    }
    fclose(f);
    struct btf_header *hdr = (struct btf_header *)data;
    if (len < sizeof *hdr || hdr->magic != 0xeB9F) {
        fprintf(stderr, "not BTF\n");
        return -1;
    }
    const unsigned char *types = data + hdr->hdr_len + hdr->type_off;
    const char *strings = (const char *)data + hdr->hdr_len + hdr->str_off;
    size_t at = 0;
    for (long id = 1; at + 12 <= hdr->type_len; id++) {
        const uint32_t *t = (const uint32_t *)(types + at);
        uint32_t kind = (t[1] >> 24) & 0x1f, vlen = t[1] & 0xffff;
        if (kind == 12 /* FUNC */ && strcmp(strings + t[0], name) == 0)
            return id;
        at += 12;
        /* What follows each kind's btf_type (linux/btf.h). */
        switch (kind) {
        case 1: /* INT */
        case 14: /* VAR */
        case 17: /* DECL_TAG */
            at += 4;
            break;
        case 3: /* ARRAY */
            at += 12;
            break;
        case 4: /* STRUCT */
        case 5: /* UNION */
        case 15: /* DATASEC */
        case 19: /* ENUM64 */
            at += 12 * (size_t)vlen;
            break;
        case 6: /* ENUM */
        case 13: /* FUNC_PROTO */
            at += 8 * (size_t)vlen;
            break;
        default:
            break;
        }
    }
    return -1;
}

static int tracing(const char *func, int attach_type) {
    long id = btf_func_id(func);
    if (id < 0) {
        printf("no BTF FUNC named %s\n", func);
        return 1;
    }
    struct bpf_insn insns[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0},
        {.code = BPF_JMP | BPF_EXIT},
    };
    static char log[65536];
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_TRACING;
    attr.expected_attach_type = attach_type;
    attr.insns = (uintptr_t)insns;
    attr.insn_cnt = 2;
    attr.license = (uintptr_t) "GPL";
    attr.attach_btf_id = id;
    attr.log_buf = (uintptr_t)log;
    attr.log_size = sizeof log;
    attr.log_level = 1;
    int prog = syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr);
    if (prog < 0) {
        printf("load failed: %s\n%s\n", strerror(errno), log);
        return 1;
    }
    memset(&attr, 0, sizeof attr);
    attr.raw_tracepoint.prog_fd = prog;
    int link = syscall(SYS_bpf, BPF_RAW_TRACEPOINT_OPEN, &attr, sizeof attr);
    if (link < 0) {
        printf("loaded, attach failed: %s\n", strerror(errno));
        return 1;
    }
    printf("attached (btf id %ld)\n", id);
    return 0;
}

/* CAP_BPF and CAP_PERFMON are newer than some C libraries' headers. */
#define CAP_PERFMON_BIT 38
#define CAP_BPF_BIT 39

static int capped(char **argv) {
    struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
    /* Best effort: without CAP_SYS_RESOURCE (some container hosts) only kernels that no longer
     * charge BPF memory to it (5.11 and later) load the probes. */
    if (setrlimit(RLIMIT_MEMLOCK, &unlimited))
        perror("capped: raising RLIMIT_MEMLOCK (going on)");
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) || setgroups(0, NULL) || setgid(65534) ||
        setuid(65534)) {
        perror("capped: becoming nobody");
        return 125;
    }
    int caps[] = {CAP_SYS_PTRACE, CAP_PERFMON_BIT, CAP_BPF_BIT};
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    for (unsigned i = 0; i < sizeof caps / sizeof caps[0]; i++) {
        data[caps[i] / 32].effective |= 1u << (caps[i] % 32);
        data[caps[i] / 32].permitted |= 1u << (caps[i] % 32);
        data[caps[i] / 32].inheritable |= 1u << (caps[i] % 32);
    }
    if (syscall(SYS_capset, &header, data)) {
        perror("capped: capset");
        return 125;
    }
    for (unsigned i = 0; i < sizeof caps / sizeof caps[0]; i++) {
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, caps[i], 0, 0)) {
            perror("capped: PR_CAP_AMBIENT_RAISE");
            return 125;
        }
    }
    execvp(argv[0], argv);
    perror("capped: exec");
    return 127;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "capped") == 0)
        return capped(argv + 2);
    if (argc == 3 && strcmp(argv[1], "echo") == 0)
        return echo(atoi(argv[2]));
    if (argc == 3 && strcmp(argv[1], "fentry") == 0)
        return tracing(argv[2], BPF_TRACE_FENTRY);
    if (argc == 3 && strcmp(argv[1], "fexit") == 0)
        return tracing(argv[2], BPF_TRACE_FEXIT);
    fprintf(stderr, "usage: %s echo PORT | fentry FUNC | fexit FUNC | capped CMD ARGS\n",
            argv[0]);
    return 2;
}
