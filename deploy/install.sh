#!/usr/bin/env bash
# Install (or update) steerd from this checkout, as root:
#   - builds the wheel (the packages steerd and quic, with the BPF C sources as package data),
#   - makes or reuses a venv at PREFIX from /usr/bin/python3 with system site packages (so
#     Debian's bcc, python3-bpfcc, imports) and installs the wheel there with its PyPI
#     dependencies; the wheel itself is kept in PREFIX/share/steerd/ for app venvs,
#   - links BINDIR/steerd to PREFIX/bin/steerd,
#   - installs the example config as CONFIG unless a file is there already,
#   - installs README.md and docs/*.md to DOCDIR,
#   - renders the systemd unit (the installed steerd, CONFIG, DOCDIR) into
#     PREFIX/share/steerd/steerd.service and, unless --no-systemd, installs it as
#     /etc/systemd/system/steerd.service and reloads systemd.
# It neither enables, starts nor restarts the daemon: it says what to run. Idempotent: run it
# again after a `git pull` to update in place.
set -euo pipefail
umask 022

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/opt/steerd
docdir=/usr/share/doc/steerd
config=/etc/steerd/steerd.toml
bindir=/usr/local/bin
systemd=1
python=/usr/bin/python3
unitdir=/etc/systemd/system

log() { printf 'install: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() {
    cat <<EOF
usage: $0 [--prefix DIR] [--docdir DIR] [--config FILE] [--bindir DIR] [--no-systemd]

  --prefix DIR    the venv steerd is installed into (default $prefix)
  --docdir DIR    where README.md and docs/ go; the unit's Documentation= (default $docdir)
  --config FILE   the config the unit runs with; the example is installed there if missing
                  (default $config)
  --bindir DIR    where the steerd command is linked to PREFIX/bin/steerd; '' for no link
                  (default $bindir)
  --no-systemd    render the unit into PREFIX/share/steerd only; do not install it
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --docdir) docdir=${2:?--docdir needs a directory}; shift 2 ;;
        --config) config=${2:?--config needs a file}; shift 2 ;;
        --bindir) [ $# -ge 2 ] || die "--bindir needs a directory (or '')"; bindir=$2; shift 2 ;;
        --no-systemd) systemd=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
for p in "$prefix" "$docdir" "$config"; do
    case "$p" in /*) ;; *) die "paths must be absolute: $p" ;; esac
done
case "$bindir" in /*|'') ;; *) die "paths must be absolute: $bindir" ;; esac

[ "$(id -u)" -eq 0 ] || die "must run as root (it writes $prefix, $docdir, /etc); try: sudo $0"
"$python" -c 'import bcc' 2>/dev/null \
    || die "$python cannot import bcc: apt-get install python3-bpfcc (deploy/setup.sh does)"
"$python" -c 'import ensurepip' 2>/dev/null \
    || die "$python cannot make venvs: apt-get install python3-venv"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The venv. An existing one is reused if it is a venv of $python with system site packages;
# anything else at the prefix is left alone.
venv_ok() {
    [ -x "$prefix/bin/python" ] && "$prefix/bin/python" -c 'import bcc, pip' 2>/dev/null \
        && grep -qx 'include-system-site-packages = true' "$prefix/pyvenv.cfg"
}
if venv_ok; then
    log "reusing the venv $prefix"
else
    if [ -e "$prefix" ] && [ ! -f "$prefix/pyvenv.cfg" ] && [ -n "$(ls -A "$prefix")" ]; then
        die "$prefix exists and is not a venv: choose another --prefix or remove it"
    fi
    log "creating the venv $prefix ($python -m venv --system-site-packages)"
    "$python" -m venv --system-site-packages "$prefix"
    venv_ok || die "the venv $prefix does not work (cannot import bcc or pip)"
fi
pip=("$prefix/bin/python" -m pip --disable-pip-version-check -q)

# The wheel, built from a copy of just what goes into it: an in-tree build would also pack
# whatever a former build left in build/ and steerd.egg-info/.
log "building the wheel from $top"
mkdir "$work/src"
cp "$top/pyproject.toml" "$top/README.md" "$work/src/"
# the top-level directories of the packages, and of the ones mapped elsewhere (bpf/)
packages=$("$python" - "$top/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
dirs = {p.split(".")[0] for p in tool["packages"]} | set(tool.get("package-dir", {}).values())
print(" ".join(sorted(d.split("/")[0] for d in dirs)))
EOF
)
for pkg in $packages; do
    cp -r "$top/$pkg" "$work/src/"
done
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"${pip[@]}" wheel --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work/dist"/steerd-*.whl)
mkdir -p "$prefix/share/steerd"
rm -f "$prefix/share/steerd"/steerd-*.whl
cp "$wheel" "$prefix/share/steerd/"
wheel="$prefix/share/steerd/$(basename "$wheel")"

log "installing $(basename "$wheel") and its dependencies into $prefix"
# First steerd itself, replaced even when the version number is the same as installed; then
# its dependencies, as the new metadata lists them (a plain install of an already-installed
# version would resolve the old metadata's).
"${pip[@]}" install --no-deps --force-reinstall "$wheel"
"${pip[@]}" install "$wheel"
# pip check also reports Debian's own packages seen through the system site packages: only
# steerd's line matters here.
if broken=$({ "$prefix/bin/python" -m pip check 2>&1 || true; } | grep '^steerd '); then
    die "steerd's dependencies are broken in $prefix: $broken"
fi
steerd="$prefix/bin/steerd"
[ -x "$steerd" ] || die "$steerd missing after the install"

if [ -n "$bindir" ]; then
    log "linking $bindir/steerd -> $steerd"
    mkdir -p "$bindir"
    ln -sfn "$steerd" "$bindir/steerd"
fi

if [ -e "$config" ]; then
    log "keeping the config $config"
else
    log "installing the example config as $config (edit it: listen addresses, ACL)"
    install -D -m 0644 "$top/deploy/steerd.toml" "$config"
fi

log "installing the docs into $docdir"
install -d "$docdir/docs"
install -m 0644 "$top/README.md" "$docdir/"
install -m 0644 "$top"/docs/*.md "$docdir/docs/"
install -D -m 0644 "$top/deploy/steerd.toml" "$docdir/examples/steerd.toml"

unit="$prefix/share/steerd/steerd.service"
log "rendering the systemd unit $unit"
sed -e "s#@STEERD@#$steerd#g" -e "s#@CONFIG@#$config#g" -e "s#@DOCDIR@#$docdir#g" \
    "$top/deploy/steerd.service" > "$work/steerd.service"
if grep -q '@[A-Z]*@' "$work/steerd.service"; then
    die "unrendered placeholder in the unit: $(grep '@[A-Z]*@' "$work/steerd.service")"
fi
install -m 0644 "$work/steerd.service" "$unit"
if [ "$systemd" -eq 1 ]; then
    log "installing the unit as $unitdir/steerd.service"
    install -D -m 0644 "$unit" "$unitdir/steerd.service"
    if [ -d /run/systemd/system ]; then
        log "systemctl daemon-reload"
        systemctl daemon-reload
    fi
fi

log "checking $config"
if ! "$steerd" check-config "$config" >/dev/null; then
    die "$config does not pass check-config (above): fix it before (re)starting steerd"
fi

log "done: $steerd"
log "next: $steerd doctor    # every prerequisite (kernel headers, bpffs, BPF), for real"
if [ "$systemd" -eq 1 ]; then
    if [ -d /run/systemd/system ] && systemctl -q is-active steerd 2>/dev/null; then
        log "steerd is running the former version: systemctl restart steerd (breaks no connection)"
    else
        log "then: systemctl enable --now steerd"
    fi
fi
