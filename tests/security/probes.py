"""Shell probes run as root inside a guest (shared by the security tests)."""

from __future__ import annotations


def split_marker(marker: str) -> str:
    """Shell words that rebuild ``marker`` at run time, so the marker itself never sits in
    an argv or a file the search could find."""
    half = len(marker) // 2
    return f"a={marker[:half]}; b={marker[half:]}; m=$a$b"


def search_everywhere(m_setup: str) -> str:
    """A root script: grep every file (but /proc, /sys, /dev), every block device and
    every process's environment."""
    return (
        f"{m_setup}; found=0; "
        'grep -lsaF "$m" /proc/[0-9]*/environ && found=1; '
        'grep -rlsF --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "$m" / && found=1; '
        "for d in /sys/block/*; do dev=/dev/$(basename $d); "
        'grep -qsaF "$m" "$dev" && { echo "in $dev"; found=1; }; done; '
        "ls /sys/block; echo found=$found"
    )
