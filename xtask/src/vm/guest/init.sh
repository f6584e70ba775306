#!/bin/sh
# PID 1 of a `cargo xtask vm-test` guest (busybox sh). Mounts the usual file systems, loads the
# listed kernel modules, reports what the kernel supports, runs /vmtest/commands/* in the order of
# /vmtest/commands.list and powers off. Markers go to ttyS1 (parsed by the host) and the console.
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
    insmod "$module" || warn "insmod $module failed"
done < /vmtest/modules.load

# What this kernel supports.
feature() {
    report "VMTEST-FEATURE $*"
}
yes_no() {
    if "$@"; then echo yes; else echo no; fi
}
feature release "$(uname -r)"
feature btf "$(yes_no test -e /sys/kernel/btf/vmlinux)"
feature lockdown "$(cat /sys/kernel/security/lockdown 2>/dev/null || echo unknown)"
feature bpf_jit "$(cat /proc/sys/net/core/bpf_jit_enable 2>/dev/null || echo unknown)"
tracing=/sys/kernel/tracing
feature kprobe_events "$(yes_no test -e $tracing/kprobe_events)"
if [ -e $tracing/kprobe_events ]; then
    if echo 'p:vmtest/probe tcp_keepalive_timer' >> $tracing/kprobe_events 2>/dev/null; then
        feature kprobe_attach yes
        echo '-:vmtest/probe' >> $tracing/kprobe_events || warn "could not remove the test kprobe"
    else
        feature kprobe_attach no
    fi
fi
functions=$(tr '\n' '|' < /vmtest/probe-functions)
functions=${functions%|}
grep -E " [tT] ($functions)(\.[a-z]+\.[0-9]+)*\$" /proc/kallsyms | awk '{print $3}' > /tmp/vmtest-kallsyms
grep -E "^($functions)( |\$)" $tracing/available_filter_functions 2>/dev/null | awk '{print $1}' > /tmp/vmtest-ftrace
while read -r f; do
    if grep -qx "$f" /tmp/vmtest-kallsyms; then k=yes
    elif grep -q "^$f\." /tmp/vmtest-kallsyms; then k="clone:$(grep "^$f\." /tmp/vmtest-kallsyms | head -n1)"
    else k=no
    fi
    feature function "$f" "kallsyms=$k" "ftrace=$(yes_no grep -qx "$f" /tmp/vmtest-ftrace)"
done < /vmtest/probe-functions
rm -f /tmp/vmtest-kallsyms /tmp/vmtest-ftrace

report "VMTEST-READY $(now)"

while read -r name <&4; do
    report "VMTEST-START $name $(now)"
    (cd /root && exec sh "/vmtest/commands/$name") < /dev/null 3>&- 4<&-
    rc=$?
    if [ "$rc" -eq 0 ]; then status=PASS; else status=FAIL; fi
    report "VMTEST-RESULT $name $status $rc $(now)"
done 4< /vmtest/commands.list

report "VMTEST-DONE $(now)"
exec 3>&-
sync
poweroff -f
# Only reached if poweroff failed: the kernel panics when init exits, and panic=-1 plus QEMU's
# -no-reboot end the VM.
exit 1
