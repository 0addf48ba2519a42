#!/bin/sh
# ldt-mkinitramfs: run by pacman's hook with the kernels' paths on stdin (usr/lib/modules/V/vmlinuz):
# /boot/vmlinuz-NAME and /boot/initramfs-NAME.img (NAME: the kernel's pkgbase), as mkinitcpio does
set -eu
share=/usr/lib/ldt-mkinitramfs
while read -r path; do
  dir=/${path%/vmlinuz}
  name=$(cat "$dir/pkgbase")
  cp "$dir/vmlinuz" "/boot/vmlinuz-$name"
  work=$(mktemp -d)
  mkdir -p "$work/bin" "$work/lib/ldt/modules"
  cp /usr/bin/busybox "$work/bin/busybox"
  cp "$share/init" "$work/init"
  : >"$work/lib/ldt/more"
  : >"$work/lib/ldt/first"
  while read -r module; do
    cp "$dir/$module" "$work/lib/ldt/modules/"
    echo "${module##*/}" >>"$work/lib/ldt/first"
  done <"$share/modules"
  cp "$share/console.cpio" "/boot/initramfs-$name.img"
  (cd "$work" && find . | cpio -o -H newc) >>"/boot/initramfs-$name.img"
  rm -rf "$work"
  echo "ldt-mkinitramfs: /boot/initramfs-$name.img"
done
