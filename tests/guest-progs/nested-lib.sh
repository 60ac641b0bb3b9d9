# Shell helpers for the nested scenarios (busybox sh in L1), prepended to a scenario script by
# its test. A scenario sets W (its work directory) before calling fail or finish.
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
# api SOCK METHOD PATH [BODY]: prints the HTTP status; the body lands in SOCK.body (one per
# socket, so requests to different VMMs may run at once).
api() {
  if [ $# -ge 4 ]; then
    curl -sS -m 150 --unix-socket "$1" -X "$2" -H 'Content-Type: application/json' -d "$4" \
      -o "$1.body" -w '%{http_code}' "http://localhost$3"
  else
    curl -sS -m 30 --unix-socket "$1" -X "$2" -o "$1.body" -w '%{http_code}' "http://localhost$3"
  fi
}
# body SOCK: the last answer's body from SOCK, on one line.
body() { tr '\n' ' ' <"$1.body"; }
vmstate() { api "$1" GET /vm >/dev/null && sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p' "$1.body"; }
wait_sock() { i=0; while [ ! -S "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; [ -S "$1" ]; }
wait_gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done; }
# stop_vmm SOCK PID NAME: Stop through the API; NAME_HUNG when it did not exit, NAME_EXIT always.
stop_vmm() {
  _s=$(api "$1" PUT /actions '{"action_type":"Stop"}'); wait_gone "$2"
  if kill -0 "$2" 2>/dev/null; then echo "$3_HUNG=1"; kill -9 "$2"; fi
  wait "$2"; echo "$3_EXIT=$? http=$_s"
}
# fail WHAT: SCRIPT_FAILED=WHAT with every VMM's stderr ($W/e*) and console ($W/g*.log) tail.
fail() {
  echo "SCRIPT_FAILED=$1"
  for f in $W/e*; do echo "== $f: $(tail -c 400 $f | tr '\n' ' ')"; done
  for f in $W/g*.log; do echo "== $f"; tail -n 15 $f; done
  exit 1
}
finish() { for f in $W/e*; do echo "VMM_STDERR_${f##*/}=$(head -c 300 $f | tr '\n' ' ')"; done; }
# boot_guest0: boots a copy of the guest rootfs ($W/disk0.ext4) as VMM 0 ($VCPUS vCPUs, default 1;
# 256 MiB, API $W/a0.sock, vsock $W/v0.sock, console $W/g0.log, stderr $W/e0) and waits for its
# agent (the scenario's `ag`); P0 is its pid. One vCPU unless the scenario is about several: QEMU's
# emulated SVM now and then loses an interrupt of a 2-vCPU L2 guest (a hang or a triple fault),
# which has nothing to do with the step under test.
boot_guest0() {
  cp /guest/rootfs.ext4 $W/disk0.ext4
  _t=$(now)
  $V run --kernel /guest/vmlinux --rootfs $W/disk0.ext4 --vcpus ${VCPUS:-1} --mem-mib 256 \
    --vsock cid=3,uds=$W/v0.sock --cmdline "$CMD" --serial-log $W/g0.log --api-sock $W/a0.sock 2>$W/e0 &
  P0=$!
  ag $W/v0.sock ping >/dev/null || fail boot
  echo "BOOT_TO_AGENT=$(since $_t)s"
}
oneline() { tr '\n' '|' | head -c 2000; }
# run KEY CMD...: runs a command, prints KEY_EXIT, KEY_OUT and KEY_ERR (output on one line).
run() {
  key=$1; shift
  "$@" >/tmp/out 2>/tmp/err
  rc=$?
  echo "${key}_EXIT=$rc"
  echo "${key}_OUT=$(oneline </tmp/out)"
  echo "${key}_ERR=$(oneline </tmp/err)"
}
