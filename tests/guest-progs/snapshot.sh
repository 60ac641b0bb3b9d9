#!/bin/sh
# Run inside the nested test host (L1) by tests/tests/snapshot_nested.rs: a guest with a counting
# loop and a long-lived agent connection is snapshotted; the snapshot is restored (the loop
# carries on, the old connection is dead), cloned twice, and restored paused and snapshotted
# again, whose state files go back to the host over the console. Prints KEY=VALUE markers the
# tests assert on; @CMDLINE@ is filled in by the test. /tmp is a tmpfs, so memory files stay
# sparse. Helpers (api, body, stop_vmm, fail, ...) are in nested-lib.sh.
set -u
V=/usr/bin/vmm
W=/tmp/w
mkdir -p $W/S $W/B
CMD='@CMDLINE@'
ag() { u=$1; shift; timeout 60 $V agent --uds "$u" --wait 30 "$@"; }
# load SOCK JSON NAME
load() { _t=$(now); _s=$(api "$1" PUT /snapshot/load "$2"); echo "$3=$_s $(since $_t)s $(body "$1")"; }
loadjson() { # MEMDIR DISK VSOCK RESUME
  printf '{"snapshot_path":"%s/vmstate","mem_backend":{"backend_type":"File","backend_path":"%s/memory"},"resume_vm":%s,"drive_overrides":[{"drive_id":"rootfs","path_on_host":"%s"}],"vsock_override":{"uds_path":"%s"}}' "$1" "$1" "$4" "$2" "$3"
}
logcheck() { awk '$0 != NR {print "bad line " NR ": " $0; bad=1; exit} END {if (!bad) print "ok " NR}' "$1"; }
# dead PID NAME N: when VMM N has exited, say why (exit status, stderr, console tail).
dead() {
  kill -0 "$1" 2>/dev/null && return 1
  wait "$1"; echo "$2_DIED=$?"
  echo "$2_STDERR=$(tr '\n' ' ' <$W/e$3)"
  tail -n 40 $W/g$3.log | sed "s/^/$2_CONSOLE: /"
  return 0
}

# --- Phase 0: boot, start a counting loop and a long-lived agent connection, snapshot --------
# Two vCPUs: the state of every vCPU must round-trip.
VCPUS=2
boot_guest0
cat > $W/loop.sh <<'EOF'
echo $$ > /tmp/loop.pid
i=0
while :; do
  i=$((i+1))
  echo $i > /tmp/counter.new && mv /tmp/counter.new /tmp/counter
  echo $i >> /root/counter.log
  sync
  sleep 0.1
done
EOF
ag $W/v0.sock write-file /root/loop.sh < $W/loop.sh || fail write-loop
ag $W/v0.sock exec -- sh -c 'setsid sh /root/loop.sh </dev/null >/dev/null 2>&1 &' || fail start-loop
i=0; c=0
while [ $i -lt 100 ]; do
  c=$(ag $W/v0.sock exec -- cat /tmp/counter 2>/dev/null); [ "${c:-0}" -ge 10 ] && break
  sleep 0.2; i=$((i+1))
done
LOOP_PID=$(ag $W/v0.sock exec -- cat /tmp/loop.pid)
echo "LOOP_PID_BEFORE=$LOOP_PID"
$V agent --uds $W/v0.sock exec -- sh -c ': OLDCONN_TICKER; while :; do echo tick; sleep 0.2; done' >$W/old.out 2>&1 &
OLDP=$!
sleep 1.5
echo "OLD_TICKS_BEFORE=$(grep -c '^tick$' $W/old.out)"
echo "OLD_TICKER_BEFORE=$(ag $W/v0.sock exec -- sh -c 'ps | grep -c "[O]LDCONN_TICKER"')"
echo "COUNTER_PRE=$(ag $W/v0.sock exec -- cat /tmp/counter)"
t=$(now); echo "PAUSE0=$(api $W/a0.sock PATCH /vm '{"state":"Paused"}') $(since $t)s $(body $W/a0.sock)"
echo "STATE0=$(vmstate $W/a0.sock)"
t=$(now)
echo "SNAP0=$(api $W/a0.sock PUT /snapshot/create '{"snapshot_type":"Full","snapshot_path":"/tmp/w/S/vmstate","mem_file_path":"/tmp/w/S/memory"}') $(since $t)s $(body $W/a0.sock)"
cp $W/disk0.ext4 $W/S/disk
echo "SNAP0_FILES=$(stat -c %s $W/S/vmstate) $(stat -c %s $W/S/memory) $(du -k $W/S/memory | cut -f1)KiB"
stop_vmm $W/a0.sock $P0 VMM0
wait_gone $OLDP
if kill -0 $OLDP 2>/dev/null; then echo "OLD_CLIENT_HUNG=1"; kill $OLDP; fi
wait $OLDP; echo "OLD_CLIENT_EXIT=$?"
echo "OLD_CLIENT_MSG=$(grep -v '^tick$' $W/old.out | tr '\n' ' ')"

# --- Phase 1: restore into a new VMM; the loop carries on; the old connection is dead --------
phase1() {
  cp $W/S/disk $W/d1.ext4
  $V run --api-sock $W/a1.sock --serial-log $W/g1.log 2>$W/e1 &
  P1=$!
  wait_sock $W/a1.sock || { dead $P1 VMM1 1; return; }
  echo "STATE1_EMPTY=$(vmstate $W/a1.sock)"
  load $W/a1.sock "$(loadjson /tmp/w/S /tmp/w/d1.ext4 /tmp/w/v1.sock true)" LOAD1
  t=$(now)
  c1=$(ag $W/v1.sock exec -- cat /tmp/counter)
  echo "COUNTER_POST1=$c1"
  echo "AGENT1_FIRST=$(since $t)s"
  if [ -z "$c1" ]; then
    dead $P1 VMM1 1 && return
    tail -n 40 $W/g1.log | sed 's/^/VMM1_CONSOLE: /'; stop_vmm $W/a1.sock $P1 VMM1; return
  fi
  echo "STATE1=$(vmstate $W/a1.sock)"
  echo "LOOP_PID_AFTER=$(ag $W/v1.sock exec -- cat /tmp/loop.pid)"
  echo "LOOP_PS=$(ag $W/v1.sock exec -- ps | awk -v p="$LOOP_PID" '$1==p' | tr -s ' ')"
  echo "LOOP_ALIVE=$(ag $W/v1.sock exec -- sh -c "kill -0 $LOOP_PID && echo yes")"
  n=x; i=0
  while [ $i -lt 50 ]; do
    n=$(ag $W/v1.sock exec -- sh -c 'ps | grep -c "[O]LDCONN_TICKER"'); [ "$n" = 0 ] && break
    sleep 0.2; i=$((i+1))
  done
  echo "OLD_TICKER_AFTER=$n $(since $t)s"
  ag $W/v1.sock ping >$W/ping1; echo "PING1=$? $(cat $W/ping1)"
  sleep 1
  echo "COUNTER_POST2=$(ag $W/v1.sock exec -- cat /tmp/counter)"
  ag $W/v1.sock exec -- cat /root/counter.log >$W/log1
  echo "LOG_CHECK=$(logcheck $W/log1)"
  ag $W/v1.sock exec -- kill $LOOP_PID
  ag $W/v1.sock freeze >/dev/null; echo "FREEZE1=$?"
  stop_vmm $W/a1.sock $P1 VMM1
  e2fsck -fn $W/d1.ext4 >$W/fsck1 2>&1; echo "FSCK1=$? $(tail -n 1 $W/fsck1)"
  debugfs -R 'cat /root/counter.log' $W/d1.ext4 2>/dev/null >$W/disklog1
  echo "DISK_LOG_CHECK=$(logcheck $W/disklog1)"
}
phase1

# --- Phase 2: two clones of the same snapshot at once ---------------------------------------
phase2() {
  for k in a b; do
    cp $W/S/disk $W/d2$k.ext4
    $V run --api-sock $W/a2$k.sock --serial-log $W/g2$k.log 2>$W/e2$k &
    eval "P2$k=$!"
  done
  for k in a b; do
    wait_sock $W/a2$k.sock || echo "CLONE_NO_API_$k=1"
    load $W/a2$k.sock "$(loadjson /tmp/w/S /tmp/w/d2$k.ext4 /tmp/w/v2$k.sock true)" CLONE_LOAD_$k
  done
  for k in a b; do
    ag $W/v2$k.sock exec -- sh -c "echo clone-$k >/root/clone.txt && echo clone-$k >/tmp/clone.txt && sync"
    r=$?; echo "CLONE_WRITE_$k=$r"
    eval "p=\$P2$k"
    [ $r = 0 ] || { dead $p CLONE_VMM_$k 2$k; return; }
  done
  for k in a b; do
    echo "CLONE_SEES_$k=$(ag $W/v2$k.sock exec -- cat /root/clone.txt /tmp/clone.txt | tr '\n' ' ')"
    echo "CLONE_STATE_$k=$(vmstate $W/a2$k.sock)"
    echo "CLONE_LOOP_$k=$(ag $W/v2$k.sock exec -- sh -c "kill -0 $LOOP_PID && echo alive")"
    ag $W/v2$k.sock ping >/dev/null; echo "CLONE_PING_$k=$?"
  done
  for k in a b; do
    ag $W/v2$k.sock freeze >/dev/null; echo "CLONE_FREEZE_$k=$?"
    eval "p=\$P2$k"; stop_vmm $W/a2$k.sock $p CLONE_VMM_$k
    echo "CLONE_DISK_$k=$(debugfs -R 'cat /root/clone.txt' $W/d2$k.ext4 2>/dev/null)"
  done
}
phase2
for p in $(jobs -p); do kill -9 $p 2>/dev/null; done

# --- Phase 3: restore paused (no overrides: same disk and socket paths), snapshot again -----
$V run --api-sock $W/a3.sock --serial-log $W/g3.log 2>$W/e3 &
P3=$!
wait_sock $W/a3.sock || fail a3-sock
load $W/a3.sock '{"snapshot_path":"/tmp/w/S/vmstate","mem_backend":{"backend_type":"File","backend_path":"/tmp/w/S/memory"},"resume_vm":false}' LOAD3
echo "STATE3=$(vmstate $W/a3.sock)"
t=$(now)
echo "SNAP3=$(api $W/a3.sock PUT /snapshot/create '{"snapshot_type":"Full","snapshot_path":"/tmp/w/B/vmstate","mem_file_path":"/tmp/w/B/memory"}') $(since $t)s $(body $W/a3.sock)"
stop_vmm $W/a3.sock $P3 VMM3
# Every differing byte: "offset(1-based) octal octal" lines.
t=$(now); cmp -l $W/S/memory $W/B/memory >$W/cmp3 2>&1; echo "MEM_CMP=$? $(since $t)s"
echo "MEM_DIFF_COUNT=$(wc -l <$W/cmp3)"
echo "MEM_DIFFS=$(head -n 96 $W/cmp3 | tr -s ' \n' '  ')"
echo "MEM_SIZES=$(stat -c %s $W/S/memory) $(stat -c %s $W/B/memory) $(du -k $W/S/memory | cut -f1)KiB $(du -k $W/B/memory | cut -f1)KiB"
# The two state files go to the host for decoding: gzip + base64 over the console, with a
# checksum. Kernel messages must not interleave with these lines.
dmesg -n 1
for x in S B; do
  echo "VMSTATE_SHA_$x=$(sha256sum $W/$x/vmstate | cut -d' ' -f1)"
  gzip -c $W/$x/vmstate | base64 | sed "s/^/VMSTATE_B64_$x=/"
done
finish
echo "SCRIPT_DONE=1"
