# Shared helpers for the resources/ build scripts. Sourced, not executed.
#
# Conventions every build script follows:
#  - artifacts live under $VMM_CACHE (default ~/.cache/vmm) in a directory named by a hash of
#    every input, so a changed input builds a new artifact and an unchanged one costs nothing;
#  - a build happens in a temporary directory that is renamed into place only on success, so an
#    interrupted build never leaves a half artifact;
#  - builds of one kind are serialized with flock, so parallel callers build once;
#  - build chatter goes to stderr; the last stdout line is the artifact path.

set -euo pipefail

VMM_CACHE="${VMM_CACHE:-$HOME/.cache/vmm}"
mkdir -p "$VMM_CACHE"

# Keep the real stdout on fd 3 for the final result line; everything else goes to stderr.
exec 3>&1 1>&2

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Print the result (artifact path) on the real stdout.
result() { printf '%s\n' "$1" >&3; }

# hash_inputs ARG...: a short hash over every argument; an argument naming a regular file
# contributes its name and content, anything else contributes itself as a string.
hash_inputs() {
    local a
    for a in "$@"; do
        if [ -f "$a" ]; then
            printf 'file %s %s\n' "$(basename "$a")" "$(sha256sum <"$a" | cut -d' ' -f1)"
        else
            printf 'str %s\n' "$a"
        fi
    done | sha256sum | cut -c1-16
}

# take_lock NAME: hold an exclusive lock on $VMM_CACHE/.lock-NAME until the script exits.
take_lock() {
    exec 9>"$VMM_CACHE/.lock-$1"
    if ! flock -n 9; then
        log "waiting for another build of $1 ..."
        flock 9
    fi
}

# pkg_version PKG: installed Debian version of PKG (fails if not installed).
pkg_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || die "package $1 is not installed (run resources/install-deps.sh)"
}
