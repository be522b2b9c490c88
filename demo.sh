#!/usr/bin/env bash
# The steerd demo, as root: set up what is missing on this machine (deploy/setup.sh), then run
# deploy/demo.py: two QUIC apps (an HTTP/3 site and a file service on ALPN "smb", which is not
# SMB) share UDP port 443 behind steerd in a server network namespace, and real clients
# (Chromium, ngtcp2, qh3, aioquic) in a client namespace each reach the app that owns the ALPN
# they ask for. Prints who served whom and a metrics excerpt, then tears everything down.
# Exit status: 0 only if every client was served by the right app.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$top/deploy/setup.sh"
exec "$top/.venv/bin/python" "$top/deploy/demo.py" "$@"
