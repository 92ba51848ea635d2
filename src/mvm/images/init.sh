#!/bin/busybox sh
# mvm initramfs /init: load virtio modules, mount the read-only root with a
# tmpfs overlay on top, copy the agent in, and hand over to it as PID 1.
# Kernel command line knobs: mvm.overlay=<tmpfs size, e.g. 256m or 50%>;
# mvm.net=1: configure eth0 (static, the slirp network; the only way out is the
# host's egress proxy at 10.0.2.100:3128).
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /mnt/ro /mnt/rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "mvm-init: $*" > /dev/console
    echo o > /proc/sysrq-trigger
    sleep 5
    exit 1
}

# Order matters: virtio_ring, virtio, virtio_mmio first (see docs/design.md).
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" 2>/dev/null || echo "mvm-init: insmod $mod failed" > /dev/console
done < /lib/modules/order

overlay=50%
net=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        mvm.overlay=*) overlay="${arg#mvm.overlay=}" ;;
        mvm.net=1) net=1 ;;
    esac
done

# The block device appears a moment after insmod: wait, bounded (10 s).
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 1000 ] && fail "root disk /dev/vda did not appear"
    usleep 10000
done

mount -t ext4 -o ro,noload /dev/vda /mnt/ro || fail "cannot mount the root filesystem"
mount -t tmpfs -o "size=$overlay,mode=0755" tmpfs /mnt/rw || fail "cannot mount the overlay tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/ro,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot \
    || fail "cannot mount the overlay"

mkdir -p /newroot/run /newroot/tmp /newroot/dev /newroot/proc /newroot/sys
mount -t tmpfs -o mode=0755,size=64m tmpfs /newroot/run
mkdir -p /newroot/run/mvm
cp /mvm/*.py /newroot/run/mvm/
chmod 0700 /newroot/run/mvm
mkdir -p /newroot/run/mvm-code
cp /mvm/code/*.py /newroot/run/mvm-code/
chmod 0755 /newroot/run/mvm-code
chmod 0644 /newroot/run/mvm-code/*.py
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
chmod 1777 /newroot/tmp
ip link set lo up 2>/dev/null
if [ "$net" = 1 ]; then
    # eth0 appears a moment after virtio_net loads: wait, bounded (5 s).
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 500 ]; do
        i=$((i + 1))
        usleep 10000
    done
    ip link set eth0 up 2>/dev/null || echo "mvm-init: no eth0" > /dev/console
    ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
    ip route add default via 10.0.2.2 dev eth0 2>/dev/null
fi

for py in /usr/bin/python3 /usr/local/bin/python3; do
    if [ -x "/newroot$py" ]; then
        exec switch_root /newroot "$py" -I /run/mvm/agent.py
    fi
done
# An image without Python (busybox, Alpine): the builder bundled its own interpreter,
# stdlib, loader and libraries under /.mvm/rt; start the agent through that loader.
rt=/.mvm/rt
if [ -x "/newroot$rt/bin/python3" ] && [ -e "/newroot$rt/lib/ld-linux-x86-64.so.2" ]; then
    exec switch_root /newroot "$rt/lib/ld-linux-x86-64.so.2" --library-path "$rt/lib" \
        "$rt/bin/python3" -I /run/mvm/agent.py
fi
fail "no python3 in the image: every mvm image needs python3-minimal for the agent"
