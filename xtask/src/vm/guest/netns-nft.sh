# Built-in vm-test network check: in a fresh network namespace (loopback only), a TCP connect to
# 127.0.0.1 with busybox nc must succeed and carry data; after an nft rule drops the port, a
# connect must fail and the rule's counter must have seen the SYNs.
set -eu
ns=vmtest-net
cleanup() {
    if [ -n "${listener:-}" ]; then kill "$listener" 2>/dev/null || true; fi
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
in_ns() {
    ip netns exec "$ns" "$@"
}
# Waits until something listens on TCP port $1 in the namespace.
wait_listen() {
    hex=$(printf '%04X' "$1")
    for _ in $(seq 50); do
        in_ns cat /proc/net/tcp /proc/net/tcp6 | grep -Eq ":$hex [0:]+:0000 0A " && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1"
    return 1
}

ip netns add "$ns"
in_ns ip link set lo up

echo "--- plain connect"
in_ns nc -l -p 7001 > /tmp/vmtest-received &
listener=$!
wait_listen 7001
echo hello | in_ns nc -w 5 127.0.0.1 7001
wait "$listener"
listener=
grep -qx hello /tmp/vmtest-received || { echo "listener received: $(cat /tmp/vmtest-received)"; exit 1; }
echo "connect ok, data received"

echo "--- connect through an nft drop rule"
in_ns nft add table inet vmtest
in_ns nft add chain inet vmtest out '{ type filter hook output priority 0; }'
in_ns nft add rule inet vmtest out tcp dport 7002 counter drop
in_ns nc -l -p 7002 > /dev/null &
listener=$!
wait_listen 7002
if echo dropped | in_ns nc -w 2 127.0.0.1 7002; then
    echo "connect succeeded although nft drops port 7002"
    exit 1
fi
in_ns nft list chain inet vmtest out
in_ns nft list chain inet vmtest out | grep -Eq 'counter packets [1-9]' || { echo "drop rule saw no packets"; exit 1; }
echo "connect blocked by nft, counter non-zero"
grep -E '^(nf_tables|nfnetlink) ' /proc/modules
