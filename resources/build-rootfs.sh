#!/usr/bin/env bash
# Build the guest root filesystem: an ext4 image (mkfs.ext4 -d) holding static busybox, our /init
# and, when given, the guest agent at /usr/sbin/vmm-agent.
# Usage: build-rootfs.sh [--agent PATH] [--size-mib N]
# Output: $VMM_CACHE/rootfs-<hash>/rootfs.ext4; the last stdout line is the image path.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

agent=
size_mib=128
while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent="${2:?--agent needs a path}"; shift 2 ;;
        --size-mib) size_mib="${2:?--size-mib needs a number}"; shift 2 ;;
        -h|--help) sed -n '2,5p' "$0" >&2; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ "$size_mib" =~ ^[0-9]+$ ]] && [ "$size_mib" -ge 8 ] || die "--size-mib must be an integer >= 8, got '$size_mib'"
if [ -n "$agent" ]; then
    [ -f "$agent" ] || die "agent binary $agent does not exist"
    agent="$(readlink -f "$agent")"
    # The rootfs has no dynamic loader: a dynamically linked agent would fail with ENOENT.
    if file_out="$(LC_ALL=C readelf -l "$agent" 2>/dev/null)" && grep -q 'Requesting program interpreter' <<<"$file_out"; then
        die "agent $agent is dynamically linked; build it with -C target-feature=+crt-static"
    fi
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (install busybox-static)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (install e2fsprogs)"

hash="$(hash_inputs "$(pkg_version busybox-static)" "$(pkg_version e2fsprogs)" "size=$size_mib" \
    "$HERE/rootfs/init" "$HERE/build-rootfs.sh" "$HERE/lib.sh" ${agent:+"$agent"} "agent=${agent:+yes}")"
out="$VMM_CACHE/rootfs-$hash"
if [ -f "$out/rootfs.ext4" ]; then result "$out/rootfs.ext4"; exit 0; fi
take_lock rootfs
if [ -f "$out/rootfs.ext4" ]; then result "$out/rootfs.ext4"; exit 0; fi

tmp="$(mktemp -d "$VMM_CACHE/.tmp-rootfs-$hash.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,run,root,mnt,var/log}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
install -m 0755 "$BUSYBOX" "$root/bin/busybox"
# One symlink per applet at its usual place (bin/sh, sbin/ip, usr/bin/env ...).
"$BUSYBOX" --list-full | while IFS= read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
[ -L "$root/bin/sh" ] || die "busybox did not provide /bin/sh"
install -m 0755 "$HERE/rootfs/init" "$root/init"
# A kernel that mounts a disk root runs /sbin/init unless told init=; both names reach our init.
ln -sf /init "$root/sbin/init"
[ -n "$agent" ] && install -m 0755 "$agent" "$root/usr/sbin/vmm-agent"

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
tty:x:5:
nogroup:x:65534:
GROUP
printf '127.0.0.1\tlocalhost\n' >"$root/etc/hosts"
echo vmm-guest >"$root/etc/hostname"
: >"$root/etc/fstab"

mkdir "$tmp/out"
mkfs.ext4 -q -F -b 4096 -L vmm-root -E root_owner=0:0 -d "$root" "$tmp/out/rootfs.ext4" "${size_mib}M" \
    || die "mkfs.ext4 failed"
mv -T "$tmp/out" "$out"
log "built $out/rootfs.ext4"
result "$out/rootfs.ext4"
