#!/bin/sh
# shellcheck shell=sh
#
# initramfs-tools local-top script (an OS image's own initrd, e.g. Debian's): open the root file
# system through dm-verity before initramfs-tools mounts root=/dev/mapper/root read-only.
#
#   ldt.verity=DATA,HASH,BLOCKS,ALG,ROOTHASH,SALT   on the kernel command line (pipeline/verity.py
#                                                  Verity.ldt_cmdline): DATA and HASH as
#                                                  PARTUUID=…/UUID=… or a /dev path, 4 KiB blocks,
#                                                  the hash tree after veritysetup's superblock
#
# Needs in the initrd: dmsetup (Debian's dmsetup hook puts it there), the dm-verity module and
# its dependencies (manual_add_modules dm-verity in a hook). No veritysetup, no udev rules: the
# table is built here and dmsetup makes the node. A missing device or a refused table panics
# with one "ldt-verity: …" line (the root must not be mounted unverified).

PREREQ=""
case $1 in
prereqs)
  echo "$PREREQ"
  exit 0
  ;;
esac

spec=
# shellcheck disable=SC2013 # the command line is words, not lines
for word in $(cat /proc/cmdline); do
  case $word in
  ldt.verity=*) spec=${word#ldt.verity=} ;;
  esac
done
[ -n "$spec" ] || exit 0

# shellcheck disable=SC1091 # initramfs-tools' own functions, in the initrd
. /scripts/functions

die() {
  echo "ldt-verity: $*" >&2
  panic "ldt-verity: $*"
  exit 1
}

old_ifs=$IFS
IFS=,
# shellcheck disable=SC2086 # split on commas on purpose
set -- $spec
IFS=$old_ifs
[ $# -eq 6 ] || die "ldt.verity= wants DATA,HASH,BLOCKS,ALG,ROOTHASH,SALT, not $spec"
data=$1 hash=$2 blocks=$3 alg=$4 roothash=$5 salt=$6

# The devices (UUID=/PARTUUID= through blkid), once they are there: up to 30 s.
wait_device() {
  tries=0
  while [ "$tries" -lt 300 ]; do
    dev=$(resolve_device "$1") && [ -b "$dev" ] && echo "$dev" && return 0
    [ "$tries" -eq 0 ] && wait_for_udev 10
    sleep 0.1
    tries=$((tries + 1))
  done
  return 1
}
data_dev=$(wait_device "$data") || die "verity data device $data is not there"
hash_dev=$(wait_device "$hash") || die "verity hash device $hash is not there"

modprobe dm-verity || die "cannot load the dm-verity module"
sectors=$((blocks * 8))
table="0 $sectors verity 1 $data_dev $hash_dev 4096 4096 $blocks 1 $alg $roothash $salt"
dmsetup create --readonly --noudevsync root --table "$table" || die "device-mapper refused the verity table"
dmsetup mknodes root
[ -b /dev/mapper/root ] || die "/dev/mapper/root did not appear"
echo "ldt-verity: root opened: $data_dev verified by $hash_dev (root hash $roothash)"
exit 0
