#!/usr/bin/env bash
# The interim steerd demo: set up what is missing, then replay the bundled first flights of
# real QUIC clients (tests/fixtures/: Chromium, qh3, aioquic v1 and v2, ngtcp2) through
# `steerd classify` and show what each client asked for. The full demo — live apps sharing
# UDP 443 in network namespaces — replaces this once the daemon lands.
# Exit status: non-zero if any client's verdict is not the one expected.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$top/deploy/setup.sh"
cd "$top"

# Table and checks in the project's venv Python (no jq/column needed on a fresh machine).
exec .venv/bin/python - <<'PY'
import json
import subprocess
import sys

FIXTURES = [  # file, client, expected verdict
    ("chromium-h3.pcapng", "Chromium 156 (2 scrambled datagrams)", "classified"),
    ("qh3-h3.pcapng", "qh3 2.1 (post-quantum, 2 datagrams)", "classified"),
    ("aioquic-v1-smb.pcapng", "aioquic 1.7, QUIC v1", "classified"),
    ("aioquic-v1-doq-h3.pcapng", "aioquic 1.7, QUIC v1", "classified"),
    ("aioquic-v2-h3-smb.pcapng", "aioquic 1.7, QUIC v2", "classified"),
    ("aioquic-v1-pq-retrans.pcapng", "aioquic 1.7, 2 datagrams + retransmission", "classified"),
    ("ngtcp2-h3.pcapng", "ngtcp2 0.12 gtlsclient (18-byte DCID)", "classified"),
    ("ngtcp2-version-1a2a3a4a.pcapng", "ngtcp2 0.12, unknown version", "version_negotiation"),
    ("aioquic-conversation.pcap", "aioquic client+server, whole handshake", "classified"),
]

print("\nsteerd classify: what each real client's first flight asked for\n")
rows = [("CLIENT", "VERSION", "SNI", "ALPN", "DATAGRAMS", "VERDICT")]
failed = []
for file, client, want in FIXTURES:
    cmd = [".venv/bin/steerd", "classify", "--port", "4433", f"tests/fixtures/{file}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        failed.append(f"{file}: steerd classify exited {proc.returncode}: {proc.stderr.strip()}")
        continue
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    if not lines:
        failed.append(f"{file}: no verdict at all")
    for line in lines:
        classified = line["verdict"] == "classified"
        rows.append((
            client,
            line.get("version", "-"),
            (line["sni"] or "(none)") if classified else "?",
            ",".join(line.get("alpn", [])) or "-",
            str(line.get("datagrams", 1)),
            line["verdict"],
        ))
        if line["verdict"] != want:
            failed.append(f"{file}: verdict {line['verdict']}, expected {want}: {line}")

widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
print("""
Each row is one JSON line of: .venv/bin/steerd classify --port 4433 tests/fixtures/FILE
Each capture is a real client's first flight, recorded on loopback by
tests/fixtures/capture.py; the tests check every answer against tshark. "version_negotiation":
the client offered a QUIC version steerd does not speak, so it would answer with Version
Negotiation (the SNI is then unknown: "?").

This is the interim demo: it shows the classifier that reads every real ClientHello.
The full demo, with live QUIC apps sharing UDP port 443 in network namespaces, comes with
the daemon.""")
for f in failed:
    print(f"demo: FAILED: {f}", file=sys.stderr)
sys.exit(1 if failed else 0)
PY
