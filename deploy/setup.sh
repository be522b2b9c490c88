#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for steerd: Debian packages, kernel headers
# for bcc (the running kernel's, else the merged-tree fallback kept in /var/cache/steerd), and a venv
# from /usr/bin/python3 that sees Debian's bcc. Every step checks first and skips what is done,
# so the demo and test commands can call it on every run.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$top/.venv"
log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (apt, BPF and network namespaces need it); try: sudo $0"
    exit 1
fi

debs=(python3-bpfcc bpfcc-tools bpftool python3-venv python3-pip iproute2 tshark tcpdump
      ngtcp2-client chromium netsniff-ng ca-certificates systemd util-linux gcc libc6-dev
      gcc-multilib nftables)  # gcc -m32: the jail's tests run a 32-bit program; nft: steerd lb-config
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# Kernel headers for bcc. The running kernel's own headers win; when Debian has none for it
# (custom or cloud kernels), merge Debian's generic -common and -amd64 trees into one tree of
# symlinks under /var/cache/steerd, where steerd looks for it (steerd/daemon/dataplane).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    if ! dpkg-query -W -f='${Status}' "linux-headers-$kver" 2>/dev/null | grep -q 'install ok'; then
        if [ "$apt_updated" -eq 0 ]; then apt-get update -q >/dev/null; apt_updated=1; fi
        if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
            apt_install "linux-headers-$kver"
        fi
    fi
fi
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed' \
        || apt_install linux-headers-amd64
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$common" ] || [ -z "$arch" ]; then
        log "no kernel headers: neither linux-headers-$kver nor linux-headers-amd64 gave a tree"
        exit 1
    fi
    dest=/var/cache/steerd/kernel-headers
    stamp="$dest/.steerd-from"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$common $arch" ]; then
        log "merging $common and $arch into $dest"
        rm -rf "$dest"
        mkdir -p "$dest"
        cp -rs "$common/." "$dest/"
        cp -rsf "$arch/." "$dest/"
        echo "$common $arch" > "$stamp"
    fi
fi

if ! mountpoint -q /sys/fs/bpf; then
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi

# The venv: /usr/bin/python3 with system site packages, so Debian's bcc imports.
want=$(sha256sum "$top/pyproject.toml" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.steerd-stamp" 2>/dev/null)" != "$want" ]; then
    log "creating venv $venv"
    [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$top[test]"
    echo "$want" > "$venv/.steerd-stamp"
fi
"$venv/bin/python" -c 'import bcc, aioquic, quic, steerd' \
    || { log "venv check failed: bcc, aioquic, quic or steerd does not import"; exit 1; }
