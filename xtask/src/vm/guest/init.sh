#!/bin/sh
# PID 1 of a `cargo xtask vm-test` guest (/bin/sh is dash; the other tools are busybox applets,
# iproute2 and nftables). Mounts the usual file systems, loads the listed kernel modules, reports
# what the kernel supports, runs /vmtest/commands/* in the order of /vmtest/commands.list and
# powers off. Markers go to ttyS1 (parsed by the host) and to the console (read by people).
export PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

if ! exec 3>/dev/ttyS1; then
    echo "vm-test: cannot open /dev/ttyS1 for results" >&2
    poweroff -f
fi

report() {
    echo "$*" >&3
    echo "$*"
}
now() {
    read -r up _ < /proc/uptime
    echo "$up"
}
warn() {
    report "VMTEST-WARN $*"
}

report "VMTEST-INIT $(now)"

mkdir -p /dev/pts /dev/shm
for m in "devpts /dev/pts" "tmpfs /dev/shm" "tmpfs /tmp" "tmpfs /run" "bpf /sys/fs/bpf" \
         "tracefs /sys/kernel/tracing" "debugfs /sys/kernel/debug" "securityfs /sys/kernel/security" \
         "cgroup2 /sys/fs/cgroup"; do
    set -- $m
    mount -t "$1" "$1" "$2" || warn "mount -t $1 $2 failed"
done
chmod 1777 /tmp
mkdir -p /run/netns

ip link set lo up || warn "ip link set lo up failed"

while read -r module; do
    if ! insmod "$module"; then
        warn "insmod $module failed"
        dmesg | tail -n 5
    fi
done < /vmtest/modules.load

# What this kernel supports.
feature() {
    report "VMTEST-FEATURE $*"
}
yes_no() {
    if "$@"; then echo yes; else echo no; fi
}
feature release "$(uname -r)"
feature version "$(uname -v)"
feature btf "$(yes_no test -e /sys/kernel/btf/vmlinux)"
lockdown=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null)
feature lockdown "${lockdown:-unknown}"
feature bpf_jit "$(cat /proc/sys/net/core/bpf_jit_enable 2>/dev/null || echo unknown)"
# Debian's kernels add a level 3 (their default) at which perf_event_open needs CAP_SYS_ADMIN.
feature perf_event_paranoid "$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null || echo unknown)"
tracing=/sys/kernel/tracing
feature kprobe_events "$(yes_no test -e $tracing/kprobe_events)"
# A real kprobe on the keep-alive timer function, removed at once.
if [ -e $tracing/kprobe_events ]; then
    if echo 'p:vmtest/probe tcp_keepalive_timer' >> $tracing/kprobe_events 2>/dev/null; then
        feature kprobe_attach yes
        echo '-:vmtest/probe' >> $tracing/kprobe_events || warn "could not remove the test kprobe"
    else
        feature kprobe_attach no
    fi
fi
# Functions: present among the kernel's text symbols (or only as compiler clones such as
# name.isra.0), and traceable by ftrace (what fentry and ftrace-based kprobes need). A
# fixed-string word match is the fastest busybox way through these big files under TCG (~1 s).
grep -Fwf /vmtest/probe-functions /proc/kallsyms | awk '$2 == "t" || $2 == "T" {print $3}' > /tmp/vmtest-kallsyms
grep -Fwf /vmtest/probe-functions $tracing/available_filter_functions 2>/dev/null | awk '{print $1}' > /tmp/vmtest-ftrace
while read -r f; do
    if grep -qx "$f" /tmp/vmtest-kallsyms; then symbol=yes
    elif clones=$(grep "^$f\." /tmp/vmtest-kallsyms); then symbol="clones:$(echo $clones | tr ' ' ',')"
    else symbol=no
    fi
    feature function "$f" "symbol=$symbol" "ftrace=$(yes_no grep -qx "$f" /tmp/vmtest-ftrace)"
done < /vmtest/probe-functions
rm -f /tmp/vmtest-kallsyms /tmp/vmtest-ftrace

report "VMTEST-READY $(now)"

# Each command runs in its own session, so that a timeout (0: none) kills everything it
# started, and whatever it leaves behind is killed before the next command.
command_timeout=$(cat /vmtest/command-timeout)
flag=/run/vmtest-timed-out
while read -r name <&4; do
    report "VMTEST-START $name $(now)"
    rm -f $flag
    # /bin/sh by path: busybox applets that run a program prefer their own applet of that name.
    (cd /root && exec setsid /bin/sh "/vmtest/commands/$name") < /dev/null 3>&- 4<&- &
    pid=$!
    watchdog=
    if [ "$command_timeout" -gt 0 ]; then
        setsid /bin/sh -c "sleep $command_timeout; touch $flag; kill -KILL -$pid" < /dev/null > /dev/null 3>&- 4<&- &
        watchdog=$!
    fi
    wait "$pid"
    rc=$?
    if [ -n "$watchdog" ]; then kill -KILL -"$watchdog" 2>/dev/null; fi
    kill -KILL -"$pid" 2>/dev/null
    if [ -e $flag ]; then status=TIMEOUT
    elif [ "$rc" -eq 0 ]; then status=PASS
    else status=FAIL
    fi
    report "VMTEST-RESULT $name $status $rc $(now)"
done 4< /vmtest/commands.list

report "VMTEST-DONE $(now)"
exec 3>&-
sync
poweroff -f
# Only reached if poweroff failed: the kernel panics when init exits, and panic=-1 plus QEMU's
# -no-reboot end the VM.
exit 1
