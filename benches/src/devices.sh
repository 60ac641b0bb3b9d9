# vmm-bench `devices` scenario: /test/run.sh inside the nested test host (L1, busybox sh).
# Boots one guest with a data drive, a TAP network device (in a network namespace) and vsock,
# then times @RUNS@ rounds of @MIB@ MiB transfers each way. Every figure is measured inside the
# guest: block with dd (O_DIRECT), TCP with busybox nc against socat in L1 (the guest is always the
# client: it receives until L1 closes, or sends until L1 has read everything and closed), vsock
# with `vmm-agent vsock-cat` (which times from connection to the peer's close). Prints
# KEY=VALUE markers that vmm-bench parses; FAIL=... ends the run.
set -u
export PATH=/opt/bin:$PATH
VMM=/usr/bin/vmm
IP=/opt/bin/ip
MIB=@MIB@
RUNS=@RUNS@
GUEST_MEM=@GUEST_MEM@
CMDLINE='@CMDLINE@'
NS=vmmbench
NSX="$IP netns exec $NS"
UDS=/tmp/bench.sock
VMM_PID=

dump() {
    echo "--- vmm output ---"; tail -n 20 /tmp/bench.vmm.log 2>/dev/null
    echo "--- guest console ---"; tail -n 40 /tmp/bench.serial 2>/dev/null
    echo "--- end ---"
}
fail() { echo "FAIL=$*"; dump; [ -n "$VMM_PID" ] && kill "$VMM_PID" 2>/dev/null; exit 1; }
ga() { $VMM agent --uds "$UDS" "$@"; }
# g ACTION ARGS: runs the guest helper below; its output is one "BYTES MS" line or a vsock-cat report.
g() { ga exec --timeout 600 -- sh /tmp/bench.sh "$@"; }

echo "L1_KERNEL=$(uname -r)"
echo "L1_CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "L1_NPROC=$(grep -c '^processor' /proc/cpuinfo)"
echo "L1_MEM_MIB=$(awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 }' /proc/meminfo)"

# The guest helper, written into the guest's tmpfs through the agent.
cat >/tmp/guest-bench.sh <<'GUEST_EOF'
# Inside the guest. Times one transfer with /proc/uptime (10 ms resolution) and prints "BYTES MS".
ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
mib=$2
bytes=$((mib * 1048576))
case "$1" in
blk-write|blk-read)
    if [ "$1" = blk-write ]; then set -- if=/dev/zero of=/dev/vdb oflag=direct
    else set -- if=/dev/vdb of=/dev/null iflag=direct; fi
    t0=$(ms)
    dd "$@" bs=1M count="$mib" 2>/tmp/dd.err || { cat /tmp/dd.err >&2; exit 1; }
    t1=$(ms)
    grep -q "^$mib+0 records out" /tmp/dd.err || { cat /tmp/dd.err >&2; exit 1; }
    echo "$bytes $((t1 - t0))" ;;
net-h2g)
    # L1 listens and sends; retry until its socat listens (only the last attempt is timed).
    i=0
    while :; do
        t0=$(ms)
        n=$(nc 172.16.0.1 7002 </dev/null | wc -c)
        t1=$(ms)
        [ "$n" -gt 0 ] && break
        i=$((i + 1)); [ $i -gt 50 ] && exit 1
        sleep 0.2
    done
    echo "$n $((t1 - t0))" ;;
net-g2h)
    i=0
    while :; do
        t0=$(ms)
        nc 172.16.0.1 7001 </tmp/src.bin 2>/dev/null && break
        i=$((i + 1)); [ $i -gt 50 ] && exit 1
        sleep 0.2
    done
    t1=$(ms)
    echo "$bytes $((t1 - t0))" ;;
make-src)
    dd if=/dev/zero of=/tmp/src.bin bs=1M count="$mib" 2>/dev/null && echo ok ;;
vsock-listen)
    rm -f /tmp/h2g.done /tmp/h2g.err
    (vmm-agent vsock-cat --listen 5000 >/dev/null 2>/tmp/h2g.err; echo $? >/tmp/h2g.done) \
        </dev/null >/dev/null 2>&1 &
    echo ok ;;
vsock-h2g-result)
    i=0
    while [ ! -e /tmp/h2g.done ]; do
        i=$((i + 1)); [ $i -gt 3000 ] && exit 1
        sleep 0.2
    done
    [ "$(cat /tmp/h2g.done)" = 0 ] || { cat /tmp/h2g.err >&2; exit 1; }
    cat /tmp/h2g.err ;;
vsock-g2h)
    vmm-agent vsock-cat --connect 2:5001 </tmp/src.bin 2>/tmp/g2h.err || { cat /tmp/g2h.err >&2; exit 1; }
    cat /tmp/g2h.err ;;
*)
    echo "unknown action $1" >&2; exit 2 ;;
esac
GUEST_EOF

cp /guest/rootfs.ext4 /tmp/rootfs.ext4 || fail "copying the rootfs"
dd if=/dev/zero of=/tmp/data.img bs=1M count="$MIB" 2>/dev/null || fail "creating the data drive"
dd if=/dev/zero of=/tmp/src.bin bs=1M count="$MIB" 2>/dev/null || fail "creating the source file"

[ -e /var/run ] || { mkdir -p /var && ln -s /run /var/run; }
$IP netns add $NS || fail "ip netns add"
$IP -n $NS link set lo up
$IP -n $NS tuntap add dev tap0 mode tap || fail "ip tuntap add"
$IP -n $NS addr add 172.16.0.1/24 dev tap0 || fail "ip addr add"
$IP -n $NS link set tap0 up || fail "ip link set up"

t0=$(awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime)
$NSX timeout $((RUNS * MIB * 30 + 600)) $VMM run --kernel /guest/vmlinux --vcpus 1 \
    --mem-mib "$GUEST_MEM" --rootfs /tmp/rootfs.ext4 --drive path=/tmp/data.img,id=data \
    --net tap=tap0 --vsock cid=3,uds="$UDS" --cmdline "$CMDLINE vmm.ip=172.16.0.2/24" \
    --serial-log /tmp/bench.serial >/tmp/bench.vmm.log 2>&1 &
VMM_PID=$!
ga --wait 90 ping >/dev/null || fail "the guest agent did not answer"
echo "BOOT_MS=$(( $(awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime) - t0 ))"
ga write-file /tmp/bench.sh </tmp/guest-bench.sh || fail "writing the guest helper"
[ "$(g make-src "$MIB")" = ok ] || fail "creating the guest's source file"
echo "GUEST_KERNEL=$(ga exec -- uname -r)"

run=1
while [ $run -le $RUNS ]; do
    echo "BLK_WRITE=$(g blk-write "$MIB")"
    echo "BLK_READ=$(g blk-read "$MIB")"

    $NSX socat -u OPEN:/tmp/src.bin TCP-LISTEN:7002,reuseaddr 2>/tmp/socat.err &
    spid=$!
    echo "NET_H2G=$(g net-h2g "$MIB")"
    wait $spid || { cat /tmp/socat.err; fail "socat (TCP host to guest) failed"; }

    rm -f /tmp/net_g2h.bin
    $NSX socat -u TCP-LISTEN:7001,reuseaddr OPEN:/tmp/net_g2h.bin,creat,trunc 2>/tmp/socat.err &
    spid=$!
    echo "NET_G2H=$(g net-g2h "$MIB")"
    wait $spid || { cat /tmp/socat.err; fail "socat (TCP guest to host) failed"; }
    echo "NET_G2H_L1_BYTES=$(stat -c %s /tmp/net_g2h.bin)"
    rm -f /tmp/net_g2h.bin

    [ "$(g vsock-listen "$MIB")" = ok ] || fail "starting the guest's vsock listener"
    i=0
    while :; do
        { printf 'CONNECT 5000\n'; cat /tmp/src.bin; } \
            | socat -t 600 - UNIX-CONNECT:"$UDS" >/tmp/h2g.reply 2>/tmp/socat.err
        grep -q '^OK ' /tmp/h2g.reply && break
        i=$((i + 1)); [ $i -gt 50 ] && { cat /tmp/socat.err; fail "vsock CONNECT 5000 refused"; }
        sleep 0.2
    done
    echo "VSOCK_H2G=$(g vsock-h2g-result "$MIB")"

    rm -f "${UDS}_5001"
    socat -u UNIX-LISTEN:"${UDS}_5001" OPEN:/dev/null 2>/tmp/socat.err &
    spid=$!
    i=0; while [ ! -S "${UDS}_5001" ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    echo "VSOCK_G2H=$(g vsock-g2h "$MIB")"
    wait $spid || { cat /tmp/socat.err; fail "socat (vsock guest to host) failed"; }
    run=$((run + 1))
done

ga exec -- reboot -f >/dev/null 2>&1
wait "$VMM_PID"
echo "VMM_EXIT=$?"
echo "BENCH_DONE=1"
