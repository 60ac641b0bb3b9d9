#!/usr/bin/env bash
# Install every Debian package the project needs (build, guest kernel, root filesystem, nested test
# host, tests). Idempotent: when everything is already installed it does not touch apt at all.
set -euo pipefail

PACKAGES=(
    # Rust build: bindgen needs libclang; cc for build scripts and linking.
    gcc libc6-dev make pkg-config libclang-dev
    # Guest kernel (tinyconfig + fragment): kconfig needs flex/bison, timeconst needs bc, objtool
    # needs libelf. No module signing and no BTF in that config, so no libssl-dev or dwarves.
    linux-source-6.1 xz-utils flex bison bc libelf-dev
    # Guest root filesystem.
    busybox-static e2fsprogs
    # Nested test host: QEMU (TCG with AMD SVM), initramfs tools, depmod.
    qemu-system-x86 cpio gzip kmod
    # Tests.
    iproute2 socat curl jq
    # vmm-bench plots: the TrueType font for their text.
    fonts-dejavu-core
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
