#!/usr/bin/env bash
# Build the nested test host (L1) from Debian packages: the current Debian 6.1 cloud kernel and a base
# initramfs (static busybox, the KVM/network modules with their dependencies, nested/init).
# Tests append their own cpio (/test/run.sh, binaries, guest images) to base.cpio.gz.
# Output: $VMM_CACHE/nested-<hash>/{vmlinuz,base.cpio.gz,kernel-release}; the last stdout line is
# that directory.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

META_PKG=linux-image-cloud-amd64
# Modules L1 needs (names as in modules.dep, without .ko); dependencies are added automatically.
MODULES=(irqbypass kvm kvm-amd tun veth bridge)
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (install busybox-static)"
for tool in apt-cache apt-get dpkg-deb depmod cpio gzip; do
    command -v "$tool" >/dev/null || die "$tool missing (run resources/install-deps.sh)"
done

resolve_kpkg() {
    apt-cache depends "$META_PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
kpkg="$(resolve_kpkg)"
if [ -z "$kpkg" ]; then
    # Package lists may be missing (fresh container): refresh them once.
    log "cannot resolve $META_PKG; running apt-get update"
    if [ "$(id -u)" -eq 0 ]; then apt-get update -q; else sudo apt-get update -q; fi
    kpkg="$(resolve_kpkg)"
fi
[ -n "$kpkg" ] || die "cannot resolve $META_PKG to a kernel package"
kver_pkg="$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')"
[ -n "$kver_pkg" ] && [ "$kver_pkg" != "(none)" ] || die "no candidate version for $kpkg"

hash="$(hash_inputs "$kpkg=$kver_pkg" "$(pkg_version busybox-static)" "modules=${MODULES[*]}" \
    "$HERE/nested/init" "$HERE/build-nested-host.sh" "$HERE/lib.sh")"
out="$VMM_CACHE/nested-$hash"
if [ -f "$out/base.cpio.gz" ]; then result "$out"; exit 0; fi
take_lock nested
if [ -f "$out/base.cpio.gz" ]; then result "$out"; exit 0; fi

tmp="$(mktemp -d "$VMM_CACHE/.tmp-nested-$hash.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Keep downloaded packages: a change to this script should not download again.
debdir="$VMM_CACHE/debs"
mkdir -p "$debdir"
deb="$(ls "$debdir/${kpkg}_"*"_amd64.deb" 2>/dev/null | grep -F "_${kver_pkg//:/%3a}_" | head -n1 || true)"
if [ -z "$deb" ]; then
    log "downloading $kpkg $kver_pkg"
    (cd "$tmp" && apt-get download -q "$kpkg=$kver_pkg") || die "apt-get download $kpkg=$kver_pkg failed"
    mv "$tmp/${kpkg}_"*.deb "$debdir/"
    deb="$(ls "$debdir/${kpkg}_"*"_amd64.deb" | grep -F "_${kver_pkg//:/%3a}_" | head -n1)"
fi
log "unpacking $deb"
dpkg-deb -x "$deb" "$tmp/pkg"

vmlinuz="$(ls "$tmp/pkg/boot/"vmlinuz-* 2>/dev/null | head -n1)"
[ -f "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
krel="${vmlinuz##*/vmlinuz-}"
moddir="$tmp/pkg/lib/modules/$krel"
[ -d "$moddir" ] || die "no lib/modules/$krel in $deb"
# The package ships no modules.dep (postinst runs depmod): make one.
depmod -b "$tmp/pkg" -F "$tmp/pkg/boot/System.map-$krel" "$krel"

# Resolve every wanted module to its path and its dependencies, dependencies first.
declare -A seen=()
order=()
add_module() { # add_module RELPATH
    local rel="$1" deps dep
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    deps="$(awk -v m="$rel:" '$1 == m { $1 = ""; print; exit }' "$moddir/modules.dep")"
    for dep in $deps; do add_module "$dep"; done
    order+=("$rel")
}
for name in "${MODULES[@]}"; do
    rel="$(awk -F: -v n="/$name.ko" 'substr($1, length($1) - length(n) + 1) == n { print $1; exit }' "$moddir/modules.dep")"
    if [ -n "$rel" ]; then
        add_module "$rel"
    elif grep -q "/$name\.ko\$" "$moddir/modules.builtin"; then
        log "module $name is built into $krel"
    else
        die "module $name is neither in modules.dep nor built into $krel"
    fi
done
log "modules (load order): ${order[*]}"

root="$tmp/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,run,root,test,guest}
install -m 0755 "$BUSYBOX" "$root/bin/busybox"
"$BUSYBOX" --list-full | while IFS= read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
for rel in "${order[@]}"; do
    install -D -m 0644 "$moddir/$rel" "$root/lib/modules/$krel/$rel"
done
printf '%s\n' "${order[@]}" >"$root/etc/nested-modules.order"
install -m 0755 "$HERE/nested/init" "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
printf '127.0.0.1\tlocalhost\n' >"$root/etc/hosts"

mkdir "$tmp/out"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) | gzip -9 >"$tmp/out/base.cpio.gz"
# The kernel accepts an uncompressed cpio after a compressed one only at a 4-byte aligned offset
# (init/initramfs.c); zero padding is skipped. Pad to 512 so appended archives just work.
truncate -s %512 "$tmp/out/base.cpio.gz"
install -m 0644 "$vmlinuz" "$tmp/out/vmlinuz"
echo "$krel" >"$tmp/out/kernel-release"
echo "$kpkg $kver_pkg" >"$tmp/out/kernel-package"
mv -T "$tmp/out" "$out"
log "built $out ($krel)"
result "$out"
