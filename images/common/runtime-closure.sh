#!/bin/sh
# Copies the given executables, the shared libraries they load, and busybox (a shell, `ip`,
# `ping`, `nc` for `docker exec` debugging) into ROOTFS, which becomes the whole image
# (`FROM scratch`): only what runs is shipped, no apt, dpkg, perl or coreutils.
# usage: runtime-closure.sh ROOTFS EXECUTABLE...
set -eu
rootfs=$1
shift
mkdir -p "$rootfs/usr/bin" "$rootfs/usr/sbin" "$rootfs/usr/lib" "$rootfs/usr/lib64" \
    "$rootfs/etc" "$rootfs/tmp" "$rootfs/run" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
chmod 1777 "$rootfs/tmp"
# Debian's /bin, /lib, /lib64 and /sbin point into /usr; the loader path is /lib64/….
for link in bin lib lib64 sbin; do
    ln -s "usr/$link" "$rootfs/$link"
done
mkdir -p "$rootfs/var"
ln -s ../run "$rootfs/var/run"
for executable in "$@" /bin/busybox; do
    cp --parents "$executable" "$rootfs"
    # ldd lines: "libx.so.1 => /path (addr)" and the loader "/lib64/ld-linux-x86-64.so.2 (addr)".
    ldd "$executable" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r library; do
    cp --parents -L "$library" "$rootfs"
done
/bin/busybox --list | while read -r applet; do
    [ -e "$rootfs/usr/bin/$applet" ] || [ -e "$rootfs/usr/sbin/$applet" ] ||
        ln -s /bin/busybox "$rootfs/usr/bin/$applet"
done
# nft resolves protocol and service names through getprotobyname/getservbyname.
cp /etc/protocols /etc/services /etc/nsswitch.conf /etc/passwd /etc/group "$rootfs/etc/"
