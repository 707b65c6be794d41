#!/usr/bin/env bash
# A stand-in for the runtime base image, gcr.io/distroless/cc-debian12:nonroot, made from
# Debian bookworm's own packages, written as a tar for `podman import`. tests/image.rs runs it
# (as root) when target/ has no such tar yet.
#
# distroless/cc ships the files of these packages and nothing else: no shell, no package
# manager, no coreutils. This does the same: it debootstraps a minimal bookworm, lists the files
# the packages own (through the merged-/usr symlinks to their real places), and copies only
# those, the generated CA bundle, and distroless's users (root, nobody, nonroot = 65532) into a
# fresh tree.
#
#   tests/image_base.sh OUT.tar WORK-DIR [MIRROR]
set -euo pipefail

out=$1
work=$2
mirror=${3:-http://deb.debian.org/debian}
packages="base-files netbase tzdata ca-certificates libc6 libgcc-s1 libgomp1 libstdc++6 libssl3"

rm -rf "$work"
mkdir -p "$work"
full="$work/debootstrap"
image="$work/image"

debootstrap --variant=minbase --include="${packages// /,}" bookworm "$full" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# Every file the packages own, at its real path (/lib/x86_64-linux-gnu/libc.so.6 is
# /usr/lib/x86_64-linux-gnu/libc.so.6 with merged /usr), with every directory above it; the
# programs and documentation left out, as distroless does.
# shellcheck disable=SC2016 # expanded by the shell inside the chroot
chroot "$full" /bin/bash -c '
    set -euo pipefail
    dpkg-query -L '"$packages"' | while read -r path; do
        [ -e "$path" ] || [ -L "$path" ] || continue
        [ -d "$path" ] && [ ! -L "$path" ] && continue
        parent=$(readlink -f "$(dirname "$path")")
        real="${parent%/}/$(basename "$path")"
        case "$real" in
            /usr/bin/* | /usr/sbin/* | /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/* | /usr/share/info/*) continue ;;
        esac
        echo "${real#/}"
        dir=$(dirname "$real")
        while [ "$dir" != / ]; do echo "${dir#/}"; dir=$(dirname "$dir"); done
    done | sort -u
' >"$work/files"

mkdir -p "$image"
# The merged-/usr links (bin -> usr/bin, lib -> usr/lib, ...) as they are, so the ELF
# interpreter /lib64/ld-linux-x86-64.so.2 resolves; then the packages' files and the CA bundle
# that update-ca-certificates generated (owned by no package).
tar -C "$full" --no-recursion -cf - bin lib lib64 sbin | tar -C "$image" -xpf -
tar -C "$full" --no-recursion -cf - -T "$work/files" | tar -C "$image" -xpf -
tar -C "$full" -cf - etc/ssl/certs | tar -C "$image" -xpf -

# distroless's users and groups, its nsswitch.conf, and the directories it ships.
cat >"$image/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$image/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' \
    >"$image/etc/nsswitch.conf"
mkdir -p "$image/tmp" "$image/root" "$image/home/nonroot" "$image/var"
chmod 1777 "$image/tmp"
chmod 0700 "$image/root" "$image/home/nonroot"
chown 65532:65532 "$image/home/nonroot"

tar --numeric-owner -C "$image" -cf "$out.partial" .
mv "$out.partial" "$out"
rm -rf "$work"
