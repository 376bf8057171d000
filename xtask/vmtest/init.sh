#!/bin/sh
# /init of the guest that `cargo xtask vmtest` boots (busybox sh, everything static in /bin).
#
# The host reads the serial console and parses only these lines:
#   VMTEST-BEGIN <step>                   the step's own output follows
#   VMTEST <step> <status> [detail]       status: pass | fail | skip (a step that failed or
#                                         was skipped fails the run), yes | no (a kernel
#                                         feature probed, not a verdict), info
#   VMTEST-DONE                           the script got to its end
# Every wait is bounded, here and on the host: a hung step fails by name, it never hangs the
# boot. A step's time limit is scaled by vmtest.slow= (1 under KVM, more under TCG).
#
# `init.sh --here` runs the same steps on the running host instead, as root, with forkwatch,
# the fixtures and vmhelper on PATH: a way to try the scenarios themselves on a kernel the
# daemon already works on. It mounts nothing and powers nothing off.
slow=1
# Detectors this kernel is known to lack (the host's Series table): each must be reported
# unavailable, with a reason, and its scenario is not played. "-" or empty: none.
unavailable=${VMTEST_UNAVAILABLE:-}
metrics_port=${VMTEST_METRICS_PORT:-9571}
echo_port=${VMTEST_ECHO_PORT:-7000}
if [ "$1" = --here ]; then
    here=1
    work=$(mktemp -d)
else
    here=
    export PATH=/bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mount -t tmpfs tmpfs /tmp
    mount -t bpf bpf /sys/fs/bpf
    mount -t debugfs debugfs /sys/kernel/debug
    mount -t tracefs tracefs /sys/kernel/tracing
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    ip link set lo up
    work=/tmp
    for arg in $(cat /proc/cmdline); do
        case $arg in
        vmtest.slow=*) slow=${arg#vmtest.slow=} ;;
        vmtest.unavailable=*) unavailable=$(echo "${arg#vmtest.unavailable=}" | tr , ' ') ;;
        esac
    done
fi
cd "$work" || exit 1

result() { echo "VMTEST $1 $2${3:+ $3}"; }

# lacks DETECTOR: this kernel is expected to run without DETECTOR.
lacks() { case " $unavailable " in *" $1 "*) return 0 ;; esac; return 1; }

# step NAME SECONDS CMD...: CMD passes by exiting 0 within SECONDS (times the slowness).
step() {
    name=$1 secs=$(($2 * slow))
    shift 2
    echo "VMTEST-BEGIN $name"
    busybox timeout "$secs" "$@" </dev/null 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        result "$name" pass
    elif [ "$rc" = 143 ]; then
        result "$name" fail "timed out after ${secs}s"
    else
        result "$name" fail "exit $rc"
    fi
}

# probe NAME CMD...: a kernel feature, yes or no; never a failure of the run.
probe() {
    name=$1
    shift
    echo "VMTEST-BEGIN $name"
    if busybox timeout $((30 * slow)) "$@" </dev/null 2>&1; then result "$name" yes; else result "$name" no; fi
}

# until_true SECONDS CMD...: polls CMD every 200 ms until it succeeds or SECONDS pass.
until_true() {
    tries=$(($1 * slow * 5))
    shift
    while [ "$tries" -gt 0 ]; do
        "$@" && return 0
        busybox usleep 200000
        tries=$((tries - 1))
    done
    return 1
}

# pid_of KEY LINE: the number after "KEY=" in a fixture's "parent=P child=C" line.
pid_of() { echo "$2" | sed -n "s/.*$1=\([0-9]*\).*/\1/p"; }

# finding KIND PID: a finding of KIND about process PID is in the daemon's output.
finding() { grep "\"kind\":\"$1\"" $work/findings | grep -q "\"pid\":$2[,}]"; }
# count KIND PID: how many findings of KIND name PID (0 when there is no such line).
count() { grep "\"kind\":\"$1\"" $work/findings | grep -c "\"pid\":$2[,}]"; }
any_finding() { grep -q "\"pid\":$1[,}]" $work/findings; }

# What expect and quiet saw, checked again once the daemon has exited and flushed everything:
# a hazard is reported exactly once, and a quiet pattern stays quiet after its first check.
expected=
quieted=

metric() { busybox wget -q -O - http://127.0.0.1:$metrics_port/metrics 2>/dev/null | grep -q "^$1 $2\$"; }

# expect KIND PID STEP: STEP passes once the daemon reports KIND for PID.
expect() {
    echo "VMTEST-BEGIN $3"
    if [ -z "$2" ]; then
        result "$3" fail "the fixture printed no pid"
    elif until_true 30 finding "$1" "$2"; then
        expected="$expected $1:$2:$3"
        result "$3" pass
    else
        result "$3" fail "no $1 finding for pid $2 within $((30 * slow))s"
    fi
}

# quiet PID STEP: STEP passes if nothing names PID (call after the grace window has passed).
quiet() {
    echo "VMTEST-BEGIN $2"
    if [ -z "$1" ]; then
        result "$2" fail "the fixture printed no pid"
    elif any_finding "$1"; then
        grep "\"pid\":$1[,}]" $work/findings
        result "$2" fail "a finding names pid $1"
    else
        quieted="$quieted $1:$2"
        result "$2" pass
    fi
}

# reported-once: the last step, after the daemon's exit. Each hazard a step saw is in the
# output exactly once (no duplicate from a retry, a restart of a decision or a second path),
# and no quiet pattern was reported later (e.g. by a deadline decision after its check).
reported_once() {
    echo "VMTEST-BEGIN reported-once"
    wrong=
    for entry in $expected; do
        kind=${entry%%:*} rest=${entry#*:}
        pid=${rest%%:*} name=${rest#*:}
        n=$(count "$kind" "$pid")
        [ "$n" = 1 ] || wrong="$wrong $name:$kind*$n"
    done
    for entry in $quieted; do
        pid=${entry%%:*} name=${entry#*:}
        if any_finding "$pid"; then
            grep "\"pid\":$pid[,}]" $work/findings
            wrong="$wrong $name:reported-later"
        fi
    done
    if [ -z "$expected" ]; then
        result reported-once fail "no hazard was seen to count"
    elif [ -n "$wrong" ]; then
        result reported-once fail "$wrong"
    else
        result reported-once pass
    fi
}

echo "VMTEST-BEGIN kernel"
uname -a
result kernel info "$(uname -r)"

step check 60 forkwatch check
# One row per detector: active (with its attach points) or why not, from check's own lines.
busybox timeout $((60 * slow)) forkwatch check >$work/check 2>&1 </dev/null
for detector in lifecycle inherited_lock shared_socket shared_file_offset; do
    echo "VMTEST-BEGIN detector:$detector"
    line=$(grep "detector $detector:" $work/check)
    echo "$line"
    if lacks "$detector"; then
        # Degraded as expected: a warning with the reason, and check still passed above.
        case $line in
        "[warn] detector $detector: unavailable: "*)
            result "detector:$detector" unavailable "${line#*unavailable: }" ;;
        "[ ok ] detector $detector: active"*)
            result "detector:$detector" fail "active, but expected unavailable on this kernel: update the series' list" ;;
        *) result "detector:$detector" fail "${line:-no line for it in forkwatch check}" ;;
        esac
        continue
    fi
    case $line in
    "[ ok ] detector $detector: active: "*) result "detector:$detector" pass "${line#*active: }" ;;
    *) result "detector:$detector" fail "${line:-no line for it in forkwatch check}" ;;
    esac
done
step selftest 180 forkwatch selftest
# The programs for older tracepoint prototypes (sched_switch without prev_state, before 5.18;
# sched_process_exit without group_dead), which no kernel of the matrix picks for itself with
# the scheduler probes usable: this kernel's verifier must take them and every detector pass.
if ! lacks inherited_lock; then
    step selftest-older-tracepoints 180 busybox env FORKWATCH_TEST_OLDER_TRACEPOINTS=1 forkwatch selftest
fi

# exits STATUS NAME CMD...: NAME passes if CMD exits with STATUS (within 120 s, scaled).
exits() {
    want=$1 name=$2 secs=$((120 * slow))
    shift 2
    echo "VMTEST-BEGIN $name"
    busybox timeout "$secs" "$@" </dev/null 2>&1
    rc=$?
    if [ "$rc" = "$want" ]; then result "$name" pass; else result "$name" fail "exit $rc, not $want"; fi
}
# forkwatch exec, the CI mode: its own daemon, only its command's tree, the exit status says it.
exits 3 exec-mt-fork-no-exec forkwatch exec --format json -- forker mt-fork-no-exec 3 50
exits 0 exec-mt-fork-exec forkwatch exec --format json -- forker mt-fork-exec 3
exits 7 exec-status forkwatch exec -- sh -c 'exit 7'
# Not root: nobody with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE only; the forker runs below a
# shell, so its fork is found by descent.
exits 3 exec-capabilities-only vmhelper capped forkwatch exec --format json -- sh -c 'forker mt-fork-no-exec 3 50; true'

# Attach points a per-kernel adaptation may need (docs/kernels-survey.md).
for func in sock_sendmsg sock_recvmsg tcp_sendmsg unix_stream_sendmsg vfs_write; do
    probe "fentry:$func" vmhelper fentry "$func"
done
# write(2) and read(2) on a socket reach sock_write_iter/sock_read_iter, not sock_sendmsg.
for func in sock_sendmsg sock_recvmsg sock_write_iter sock_read_iter; do
    probe "fexit:$func" vmhelper fexit "$func"
done
probe kprobes test -e /sys/kernel/tracing/kprobe_events

# End to end: the daemon as a user runs it, real fixtures, findings read from its stdout.
forkwatch run --format json --log-format json --metrics-addr 127.0.0.1:$metrics_port \
    --exec-grace 2s --deadlock-after 1s >$work/findings 2>$work/daemon.log &
daemon=$!
echo "VMTEST-BEGIN daemon-ready"
# ready_or_gone: the daemon is ready, or has exited (no use waiting for it then).
ready_or_gone() { grep -q '"message":"ready"' "$work/daemon.log" || ! kill -0 "$daemon" 2>/dev/null; }
until_true 60 ready_or_gone
if grep -q '"message":"ready"' "$work/daemon.log"; then
    result daemon-ready pass
    ready=1
else
    tail -n 40 $work/daemon.log
    if kill -0 "$daemon" 2>/dev/null; then
        result daemon-ready fail "no ready line within $((60 * slow))s"
    else
        wait "$daemon"
        result daemon-ready fail "it exited ($?) before it was ready"
    fi
    ready=
fi

scenarios="mt-fork-no-exec fork-stack mt-fork-exec st-fork mt-posix-spawn inherited-lock-deadlock
shared-tcp tcp-handoff shared-file-offset daemon-exit reported-once"
if [ -z "$ready" ]; then
    kill "$daemon" 2>/dev/null
    for name in $scenarios; do result "$name" skip "the daemon is not running"; done
else
    echo_pid=$(pid_of pid "$(vmhelper echo "$echo_port")")

    # The quiet patterns first, all at once, then one wait past the grace window for them all.
    exec_out=$(forker mt-fork-exec 3 </dev/null)
    st_out=$(forker st-fork 1 50 </dev/null)
    spawn_out=$(forker mt-posix-spawn 3 </dev/null)
    handoff_out=$(sharer handoff "$echo_port" </dev/null)
    sleep $((4 * slow))
    quiet "$(pid_of child "$exec_out")" mt-fork-exec
    quiet "$(pid_of child "$st_out")" st-fork
    quiet "$(pid_of child "$spawn_out")" mt-posix-spawn
    quiet "$(pid_of child "$handoff_out")" tcp-handoff

    out=$(forker mt-fork-no-exec 3 50 </dev/null)
    expect mt_fork_no_exec "$(pid_of child "$out")" mt-fork-no-exec
    # Its fork_stack: unwound from the kernel's copy down to forker's main, which called
    # fork(); where the kernel lacks bpf_task_pt_regs, null with the reason.
    echo "VMTEST-BEGIN fork-stack"
    line=$(grep '"kind":"mt_fork_no_exec"' $work/findings | grep "\"pid\":$(pid_of child "$out")[,}]")
    if lacks fork_stack; then
        case $line in
        *'"fork_stack_unavailable_reason":"kernel_unsupported"'*)
            result fork-stack unavailable "kernel_unsupported" ;;
        *) echo "$line"; result fork-stack fail "expected fork_stack null with kernel_unsupported" ;;
        esac
    else
        case $line in
        *'"fork_stack":[{'*'"function":"main","module":"forker"'*)
            result fork-stack pass "$(echo "$line" | sed -n 's/.*"fork_site":"\([^"]*\)".*/\1/p')" ;;
        *) echo "$line"; result fork-stack fail "no fork_stack through forker's main" ;;
        esac
    fi

    locker deadlock 600000 </dev/null >$work/locker.out &
    locker=$!
    until_true 10 grep -q child= $work/locker.out
    child=$(pid_of child "$(cat $work/locker.out)")
    expect inherited_lock_deadlock "$child" inherited-lock-deadlock
    kill -9 "$locker" $child 2>/dev/null

    if lacks shared_socket; then
        result shared-tcp unavailable "shared_socket is unavailable on this kernel"
    else
        out=$(sharer tcp "$echo_port" </dev/null)
        expect shared_socket "$(pid_of child "$out")" shared-tcp
    fi

    # The write probe is attached only while a child goes without exec: write after it is.
    if lacks shared_file_offset; then
        result shared-file-offset unavailable "shared_file_offset is unavailable on this kernel"
    else
        mkfifo $work/go
        sharer file $work/shared.txt <$work/go >$work/file.out &
        exec 3>$work/go
        until_true 20 metric forkwatch_write_probe_attached 1
        echo go >&3
        until_true 10 grep -q child= $work/file.out
        expect shared_file_offset "$(pid_of child "$(cat $work/file.out)")" shared-file-offset
        exec 3>&-
    fi

    echo "VMTEST-BEGIN daemon-exit"
    kill -INT "$daemon"
    # wait has no time limit: a watchdog kills the daemon if it ignores SIGINT.
    (sleep $((20 * slow)); kill -9 "$daemon" 2>/dev/null) &
    watchdog=$!
    wait "$daemon"
    rc=$?
    kill "$watchdog" 2>/dev/null
    if [ "$rc" = 0 ]; then result daemon-exit pass; else result daemon-exit fail "exit $rc"; fi
    reported_once
fi

echo "VMTEST-BEGIN daemon-log"
tail -n 60 $work/daemon.log
result daemon-log info

echo VMTEST-DONE
if [ -n "$here" ]; then
    # Only what this script started: the echo server and the work dir.
    [ -n "$echo_pid" ] && kill "$echo_pid"
    rm -rf "$work"
    exit 0
fi
sync
poweroff -f
# If poweroff could not, init exits: the kernel panics, and panic=-1 with -no-reboot ends QEMU.
