#!/usr/bin/env bash
# Build the guest kernel (vmlinux, ELF, PVH entry) from Debian's linux-source-6.1:
# tinyconfig + kernel/guest.fragment + the int3 self-test patch.
# Output: $VMM_CACHE/kernel-<hash>/{vmlinux,config}; the last stdout line is the vmlinux path.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

SRC_PKG=linux-source-6.1
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
FRAGMENT="$HERE/kernel/guest.fragment"
PATCH_SED="$HERE/kernel/skip-int3-selftest.sed"
PATCH_MARK='vmm: int3_selftest() skipped'

[ -f "$SRC_TAR" ] || die "$SRC_TAR missing (run resources/install-deps.sh)"
hash="$(hash_inputs "$(pkg_version "$SRC_PKG")" "$FRAGMENT" "$PATCH_SED" "$HERE/build-kernel.sh" "$HERE/lib.sh")"
out="$VMM_CACHE/kernel-$hash"

if [ -f "$out/vmlinux" ]; then result "$out/vmlinux"; exit 0; fi
take_lock kernel
if [ -f "$out/vmlinux" ]; then result "$out/vmlinux"; exit 0; fi

tmp="$(mktemp -d "$VMM_CACHE/.tmp-kernel-$hash.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

log "extracting $SRC_TAR"
tar -C "$tmp" -xf "$SRC_TAR"
src="$tmp/linux-source-6.1"
[ -d "$src" ] || die "unexpected tarball layout: no linux-source-6.1/ in $SRC_TAR"

log "patching arch/x86/kernel/alternative.c"
sed -i -f "$PATCH_SED" "$src/arch/x86/kernel/alternative.c"
grep -qF "$PATCH_MARK" "$src/arch/x86/kernel/alternative.c" \
    || die "int3_selftest patch did not apply to arch/x86/kernel/alternative.c"
if grep -qP '^\tint3_selftest\(\);' "$src/arch/x86/kernel/alternative.c"; then
    die "int3_selftest() is still called after patching"
fi

cd "$src"
log "configuring (tinyconfig + $(basename "$FRAGMENT"))"
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >/dev/null
make -s olddefconfig

# Every setting of the fragment must have survived olddefconfig (a dependency we forgot would
# silently drop it otherwise).
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) want="$line" ;;
        "# CONFIG_"*" is not set") want="$line" ;;
        *) continue ;;
    esac
    sym="${want#\# }"; sym="${sym%%[= ]*}"
    if [[ "$want" == *" is not set" ]]; then
        # Absent from .config also means "not set" (its dependencies are off).
        if grep -q "^$sym=" .config; then
            log "fragment wants '$want' but .config has '$(grep "^$sym=" .config)'"
            missing=1
        fi
    elif ! grep -qxF "$want" .config; then
        log "fragment wants '$want' but .config has '$(grep -E "^(# )?$sym[= ]" .config || echo "<absent>")'"
        missing=1
    fi
done <"$FRAGMENT"
[ "$missing" = 0 ] || die "kernel config does not match $FRAGMENT (see above)"

log "building vmlinux with $(nproc) jobs"
make -s -j"$(nproc)" vmlinux

mkdir "$tmp/out"
cp vmlinux "$tmp/out/vmlinux"
cp .config "$tmp/out/config"
mv -T "$tmp/out" "$out"
log "built $out/vmlinux in $(( $(date +%s) - start ))s"
result "$out/vmlinux"
