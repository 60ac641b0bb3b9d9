#!/bin/sh
# Run inside the nested test host (L1) by tests/tests/lazy_live.rs: live snapshots of a guest that
# runs guest-progs/stamp.c, scanned with guest-progs/scan.c; lazy restores without and with the
# working set and from a file; three lazy clones at once. Prints KEY=VALUE markers the tests
# assert on. @NAME@ placeholders are filled in by the test. /tmp is a tmpfs, so memory files stay
# sparse. The helpers it uses beyond these (api, stop_vmm, fail, ...) are in nested-lib.sh.
set -u
V=/usr/bin/vmm
W=/tmp/w
NP=@NPAGES@
MIB=@MIB@
MIB2=@MIB2@
mkdir -p $W/L $W/F
CMD='@CMDLINE@'
ag() { u=$1; shift; timeout 100 $V agent --uds "$u" --wait 60 "$@"; }
count() { ag "$1" exec -- cat /run/stamp.count 2>/dev/null | tr -d ' \n'; }
wait_count() { # UDS MIN: the stamper's round once it reached MIN
  _i=0; _c=0
  while [ $_i -lt 150 ]; do
    _c=$(count "$1"); [ "${_c:-0}" -ge "$2" ] 2>/dev/null && break; sleep 0.2; _i=$((_i+1))
  done
  echo "${_c:-0}"
}
# diag UDS: the stamper's state, user time and CPU; per-CPU timer interrupts; guest uptime
diag() {
  ag "$1" exec -- sh -c 'p=$(pidof stamp); set -- $(cat /proc/$p/stat); echo "state=$3 utime=${14} cpu=${39}"; grep LOC /proc/interrupts | tr -s " "; echo "uptime=$(cat /proc/uptime)"' | tr '\n' ' '
}
# alive UDS NAME: the stamper's round; two rounds later (the first full pass after a restore or a
# live snapshot faults its pages in, which in the nested host takes ~0.1-1 ms per page); then
# again 1 s later; its error file, its pid, the agent
alive() {
  _a=$(count "$1"); _t=$(now); _b=$_a
  while [ "$(awk -v a=$_t -v b=$(now) 'BEGIN{print (b-a<40)}')" = 1 ]; do
    _b=$(count "$1"); [ "${_b:-0}" -ge "$((${_a:-0} + 2))" ] 2>/dev/null && break; sleep 0.3
  done
  echo "$2_NEXT_ROUNDS=$(since $_t)s"
  sleep 1; _c=$(count "$1")
  echo "$2_COUNTS=${_a:-none} ${_b:-none} ${_c:-none}"
  [ "${_b:-x}" = "${_c:-y}" ] && echo "$2_DIAG=$(diag $1)"
  echo "$2_ERR=$(ag "$1" exec -- sh -c 'cat /run/stamp.err 2>/dev/null || echo none' | tr '\n' ' ')"
  echo "$2_PID=$(ag "$1" exec -- pidof stamp)"
  ag "$1" ping >/dev/null; echo "$2_PING=$?"
}
# loadjson MEMFILE BACKEND DISK VSOCK [WORKING_SET_JSON]
loadjson() {
  _w=; [ -n "${5:-}" ] && _w=",\"working_set\":$5"
  printf '{"snapshot_path":"%s","mem_backend":{"backend_type":"%s","backend_path":"%s"},"resume_vm":true,"drive_overrides":[{"drive_id":"rootfs","path_on_host":"%s"}],"vsock_override":{"uds_path":"%s"}%s}' \
    "$(dirname $1)/vmstate" "$2" "$1" "$3" "$4" "$_w"
}

# --- Phase 0: boot, start the stamper -------------------------------------------------------
boot_guest0
ag $W/v0.sock write-file /run/stamp --mode 755 </lazy/stamp || fail write-stamp
ag $W/v0.sock exec -- sh -c "setsid /run/stamp $MIB 1 </dev/null >/dev/null 2>&1 &" || fail start-stamp
echo "STAMP_STARTED=$(wait_count $W/v0.sock 3)"

# --- Phase 1: live snapshots while the stamper runs; scan each image ------------------------
for n in 1 2 3; do
  echo "LIVE_COUNT_BEFORE_$n=$(count $W/v0.sock)"
  t=$(now)
  st=$(api $W/a0.sock PUT /snapshot/create '{"snapshot_type":"Live","snapshot_path":"/tmp/w/L/vmstate","mem_file_path":"/tmp/w/L/memory"}')
  echo "LIVE_$n=$st $(since $t)s"
  echo "LIVE_REPLY_$n=$(body $W/a0.sock)"
  echo "LIVE_STATE_$n=$(vmstate $W/a0.sock)"
  echo "LIVE_COUNT_AFTER_$n=$(count $W/v0.sock)"
  echo "LIVE_FILES_$n=$(stat -c %s $W/L/vmstate) $(stat -c %s $W/L/memory) $(du -k $W/L/memory | cut -f1)KiB"
  t=$(now); /lazy/scan $W/L/memory $NP SCAN$n | tee $W/scan; echo "SCAN_TIME_$n=$(since $t)s"
  # How long after the scan the stamper finishes the round it was in at the pause.
  mx=$(sed -n "s/^SCAN${n}_MAX=//p" $W/scan); t=$(now); c=0
  while [ "$(awk -v a=$t -v b=$(now) 'BEGIN{print (b-a<20)}')" = 1 ]; do
    c=$(count $W/v0.sock); [ "${c:-0}" -ge "${mx:-0}" ] 2>/dev/null && break; sleep 0.2
  done
  echo "LIVE_ROUND_DONE_$n=$(since $t)s round $c"
done
cp $W/disk0.ext4 $W/L/disk
alive $W/v0.sock SOURCE

# --- Phase 2: a throttled stamper for a full snapshot (the clones run three at once) --------
ag $W/v0.sock exec -- sh -c "kill \$(pidof stamp); sleep 0.3; rm -f /run/stamp.count /run/stamp.err; setsid /run/stamp $MIB2 1 100000 </dev/null >/dev/null 2>&1 &" || fail restart-stamp
echo "STAMP2_STARTED=$(wait_count $W/v0.sock 3)"
echo "PAUSE0=$(api $W/a0.sock PATCH /vm '{"state":"Paused"}')"
t=$(now)
echo "FULL=$(api $W/a0.sock PUT /snapshot/create '{"snapshot_type":"Full","snapshot_path":"/tmp/w/F/vmstate","mem_file_path":"/tmp/w/F/memory"}') $(since $t)s $(body $W/a0.sock)"
cp $W/disk0.ext4 $W/F/disk
echo "FULL_FILES=$(stat -c %s $W/F/memory) $(du -k $W/F/memory | cut -f1)KiB"
stop_vmm $W/a0.sock $P0 VMM0
rm -f $W/disk0.ext4

# --- Phase 3: restore the last live snapshot; the stamper carries on ------------------------
$V run --api-sock $W/aL.sock --serial-log $W/gL.log 2>$W/eL &
PL=$!
wait_sock $W/aL.sock || fail aL-sock
t=$(now)
echo "LIVE_LOAD=$(api $W/aL.sock PUT /snapshot/load "$(loadjson /tmp/w/L/memory File /tmp/w/L/disk /tmp/w/vL.sock)") $(since $t)s $(body $W/aL.sock)"
alive $W/vL.sock LIVE_RESTORED
echo "LIVE_RESTORED_STATE=$(vmstate $W/aL.sock)"
stop_vmm $W/aL.sock $PL VMML
rm -rf $W/L

# --- Phase 4: lazy restores of the full snapshot, restore to agent answer -------------------
# restore NAME BACKEND [WORKING_SET_JSON]: READY_NAME=<load http> <ping exit> <to ready s> <load s>
restore() {
  cp $W/F/disk $W/d$1.ext4
  $V run --api-sock $W/a$1.sock --serial-log $W/g$1.log 2>$W/e$1 &
  eval "P$1=$!"
  wait_sock $W/a$1.sock || fail a$1-sock
  _j=$(loadjson /tmp/w/F/memory $2 /tmp/w/d$1.ext4 /tmp/w/v$1.sock "${3:-}")
  _t=$(now)
  _s=$(api $W/a$1.sock PUT /snapshot/load "$_j")
  _l=$(since $_t)
  ag $W/v$1.sock ping >/dev/null; _p=$?
  echo "READY_$1=$_s $_p $(since $_t) $_l $(body $W/a$1.sock)"
}
restore a Uffd '{"prefetch":false,"record_ms":0,"background_fill":false}'
echo "WS_SAVE_a=$(api $W/aa.sock PUT /actions '{"action_type":"SaveWorkingSet"}') $(body $W/aa.sock)"
echo "STATS_a=$(api $W/aa.sock GET /snapshot/memory-stats) $(body $W/aa.sock)"
echo "WS_FILE=$(stat -c %s $W/F/memory.ws 2>/dev/null || echo none)"
alive $W/va.sock LAZY_a
stop_vmm $W/aa.sock $Pa VMMa
rm -f $W/da.ext4

restore b Uffd '{"prefetch":true,"record_ms":0,"background_fill":false}'
echo "STATS_b=$(api $W/ab.sock GET /snapshot/memory-stats) $(body $W/ab.sock)"
alive $W/vb.sock LAZY_b
stop_vmm $W/ab.sock $Pb VMMb
rm -f $W/db.ext4

restore c File
alive $W/vc.sock LAZY_c
stop_vmm $W/ac.sock $Pc VMMc
rm -f $W/dc.ext4

# --- Phase 5: three lazy clones at once (working set prefetched, background fill) -----------
for c in 1 2 3; do
  cp $W/F/disk $W/dk$c.ext4
  $V run --api-sock $W/ak$c.sock --serial-log $W/gk$c.log 2>$W/ek$c &
  eval "PK$c=$!"
done
for c in 1 2 3; do wait_sock $W/ak$c.sock || fail ak$c-sock; done
LP=
for c in 1 2 3; do
  ( t=$(now); st=$(api $W/ak$c.sock PUT /snapshot/load "$(loadjson /tmp/w/F/memory Uffd /tmp/w/dk$c.ext4 /tmp/w/vk$c.sock)")
    echo "CLONE_LOAD_$c=$st $(since $t)s $(body $W/ak$c.sock)" ) &
  LP="$LP $!"
done
for p in $LP; do wait $p; done
for c in 1 2 3; do
  ag $W/vk$c.sock exec -- sh -c "echo clone-$c >/root/clone.txt && echo clone-$c >/tmp/clone.txt && sync"
  echo "CLONE_WRITE_$c=$?"
done
for c in 1 2 3; do
  echo "CLONE_SEES_$c=$(ag $W/vk$c.sock exec -- cat /root/clone.txt /tmp/clone.txt | tr '\n' ' ')"
  echo "CLONE_STATE_$c=$(vmstate $W/ak$c.sock)"
  alive $W/vk$c.sock CLONE_$c
  echo "CLONE_STATS_$c=$(api $W/ak$c.sock GET /snapshot/memory-stats) $(body $W/ak$c.sock)"
done
for c in 1 2 3; do
  eval "p=\$PK$c"; stop_vmm $W/ak$c.sock $p CLONE_VMM_$c
done
finish
echo "SCRIPT_DONE=1"
