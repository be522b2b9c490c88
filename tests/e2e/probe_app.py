"""A minimal steerd app for the daemon tests: registers, then reports every datagram it gets.

Run inside the server namespace: ``probe_app.py CONTROL_PATH APP ALPN[,ALPN...] [WORKERS]``.
It prints one JSON line when registered (slots, server IDs, socket addresses) and one per
datagram received on any of its worker sockets (slot, client address, size, first byte), and
exits when its standard input closes: the test controls its life, and a disconnect is just
closing stdin. No QUIC stack: the daemon's job ends at delivery, which is what is checked.
"""

import json
import selectors
import sys

from steerd.control import ControlClient, ControlError


def main() -> int:
    path, app, alpns = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    client = ControlClient(path)
    try:
        reg = client.register(app, alpns, workers=workers)
    except ControlError as exc:
        print(json.dumps({"event": "refused", "reason": exc.reason, "error": str(exc)}),
              flush=True)
        return 0
    sel = selectors.DefaultSelector()
    for worker in reg.workers:
        for sock in reg.worker_sockets(worker["slot"]):
            sel.register(sock, selectors.EVENT_READ, worker["slot"])
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print(json.dumps({"event": "registered", "generation": reg.generation,
                      "slots": [w["slot"] for w in reg.workers],
                      "reset_key": reg.reset_key.hex()}), flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                if not sys.stdin.readline():
                    client.close()
                    return 0
                continue
            data, addr = key.fileobj.recvfrom(65535)  # type: ignore[union-attr]
            print(json.dumps({"event": "datagram", "slot": key.data, "from": list(addr[:2]),
                              "len": len(data), "first_byte": data[0]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
