"""A minimal steerd app for the daemon tests: registers, then reports every datagram it gets.

Run inside the server namespace:
``probe_app.py CONTROL_PATH APP ALPN[,ALPN...] [WORKERS] [--resume] [--names=N1,N2]``.
With ``--resume`` it behaves like an app built to survive daemon restarts: when its control
connection breaks it reconnects and resumes its slots with the sockets it kept (printing a
"resumed" line); without, it just keeps serving on its sockets, never re-registering.
It prints one JSON line when registered (generation, slots, their reset keys) and one per
datagram received on any of its worker sockets (slot, client address, size, first byte), and
exits when its standard input closes: the test controls its life, and a disconnect is just
closing stdin. No QUIC stack: the daemon's job ends at delivery, which is what is checked.
"""

import json
import selectors
import sys

from steerd.app.client import ControlClient
from steerd.app.protocol import ControlError, Registration


def reset_keys(reg: Registration) -> dict[str, str]:
    """Each slot's stateless-reset key (hex), by slot: what the workers would advertise with."""
    return {str(w["slot"]): reg.reset_key_of(w["slot"]).hex() for w in reg.workers}


def try_resume(
    path: str, app: str, alpns: list[str], names: list[str], reg: Registration
) -> tuple[ControlClient, Registration] | None:
    """One attempt to hand our slots to a restarted daemon; None while none answers (a dying
    daemon's socket may even accept a connection and then reset it)."""
    client = None
    try:
        client = ControlClient(path, timeout=5)
        return client, client.resume(app, alpns, names, reg)
    except OSError:
        if client is not None:
            client.close()
        return None


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--resume" and not a.startswith("--names=")]
    resume = "--resume" in sys.argv
    names = [n for a in sys.argv if a.startswith("--names=") for n in a[8:].split(",") if n]
    path, app, alpns = args[0], args[1], args[2].split(",")
    workers = int(args[3]) if len(args) > 3 else 1
    client = ControlClient(path)
    try:
        reg = client.register(app, alpns, names, workers=workers)
    except ControlError as exc:
        print(json.dumps({"event": "refused", "reason": exc.reason, "error": str(exc)}),
              flush=True)
        return 0
    sel = selectors.DefaultSelector()
    for worker in reg.workers:
        for sock in reg.worker_sockets(worker["slot"]):
            sel.register(sock, selectors.EVENT_READ, worker["slot"])
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    if resume:
        sel.register(client.sock, selectors.EVENT_READ, "control")
    print(json.dumps({"event": "registered", "generation": reg.generation,
                      "slots": [w["slot"] for w in reg.workers],
                      "reset_keys": reset_keys(reg)}), flush=True)
    resuming = False  # the daemon went away: retry the resume between datagrams
    while True:
        if resuming:
            done = try_resume(path, app, alpns, names, reg)
            if done is not None:
                client, reg = done
                resuming = False
                sel.register(client.sock, selectors.EVENT_READ, "control")
                print(json.dumps({"event": "resumed", "slots": [w["slot"] for w in reg.workers],
                                  "reset_keys": reset_keys(reg)}), flush=True)
        for key, _ in sel.select(0.02 if resuming else None):
            if key.data is None:
                if not sys.stdin.readline():
                    client.close()
                    return 0
                continue
            if key.data == "control":  # only EOF comes unasked: the daemon went away
                sel.unregister(client.sock)
                client.close()
                resuming = True
                continue
            data, addr = key.fileobj.recvfrom(65535)  # type: ignore[union-attr]
            print(json.dumps({"event": "datagram", "slot": key.data, "from": list(addr[:2]),
                              "len": len(data), "first_byte": data[0]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
