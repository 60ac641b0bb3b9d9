#!/usr/bin/env bash
# Build everything and run the main job: boot the default guest, snapshot it, restore the
# snapshot in a new VMM process and show that the guest carries on.
#
# On an ordinary KVM host the guest boots to user space with the guest agent; the restored guest
# answers the agent. On a kvm_pvm host (guest user space cannot make system calls there) the
# kernel is snapshotted mid-boot and the restored kernel carries on to "Run /sbin/init".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f s", b - a }'; }

step "installing Debian packages (skipped when present)"
bash resources/install-deps.sh

step "building vmm and the static guest agent"
cargo build --release --locked -p vmm-cli
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$root/target/guest" \
    cargo build --release --locked -p guest-agent --bin vmm-agent --target x86_64-unknown-linux-gnu
vmm="$root/target/release/vmm"
agent="$root/target/guest/x86_64-unknown-linux-gnu/release/vmm-agent"

step "building the guest kernel and root filesystem (cached under \${VMM_CACHE:-~/.cache/vmm})"
kernel=$(bash resources/build-kernel.sh | tail -n 1)
rootfs_image=$(bash resources/build-rootfs.sh --agent "$agent" | tail -n 1)

work=$(mktemp -d /tmp/vmm-quickstart.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
cp "$rootfs_image" "$work/rootfs.ext4"
api="$work/api.sock"
vsock="$work/vsock.sock"
snap="$work/snapshot"
mkdir -p "$snap"
curl_api() { curl -sf --unix-socket "$api" -X "$1" "http://localhost$2" ${3:+-d "$3"}; }

pvm=no
[ -e /sys/module/kvm_pvm ] && pvm=yes

step "booting the default guest (1 vCPU, 256 MiB, ext4 root on virtio-blk, vsock)"
t=$(now)
"$vmm" run --kernel "$kernel" --rootfs "$work/rootfs.ext4" --mem-mib 256 --vcpus 1 \
    --vsock "cid=3,uds=$vsock" --api-sock "$api" --serial-log "$work/boot.log" &
vmm_pid=$!
if [ "$pvm" = yes ]; then
    echo "kvm_pvm host: guest kernel mode is emulated here; snapshotting the kernel mid-boot"
    sleep 12
else
    "$vmm" agent --uds "$vsock" --wait 60 ping
    echo "guest user space ready after $(since "$t")"
    "$vmm" agent --uds "$vsock" exec -- sh -c 'uname -a; echo "hello from before the snapshot" > /root/note'
fi

step "pausing and taking a full snapshot"
t=$(now)
curl_api PATCH /vm '{"state":"Paused"}'; echo
curl_api PUT /snapshot/create "{\"snapshot_path\":\"$snap/vmstate\",\"mem_file_path\":\"$snap/memory\"}"; echo
echo "pause + snapshot: $(since "$t")"
ls -ls "$snap"
curl_api PUT /actions '{"action_type":"Stop"}' >/dev/null || true
wait "$vmm_pid" || true

step "restoring the snapshot in a new VMM process"
t=$(now)
"$vmm" run --restore "$snap" --api-sock "$api" --serial-log "$work/restore.log" &
vmm_pid=$!
if [ "$pvm" = yes ]; then
    for _ in $(seq 120); do
        grep -q "Run /sbin/init" "$work/restore.log" 2>/dev/null && break
        sleep 1
    done
    grep "Run /sbin/init" "$work/restore.log"
    echo "the restored kernel carried on to init ($(since "$t") after restore)"
    wait "$vmm_pid" || true
else
    "$vmm" agent --uds "$vsock" --wait 30 exec -- cat /root/note
    echo "the restored guest answers ($(since "$t") after restore)"
    "$vmm" agent --uds "$vsock" exec -- reboot -f || true
    wait "$vmm_pid" || true
fi
step "done; logs and the snapshot are in $work"
