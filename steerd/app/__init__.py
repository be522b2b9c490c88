"""The app side: what a QUIC server behind steerd imports, running as the app's own user.

``protocol`` (the control protocol both sides share), ``client`` (the control client),
``sdk`` (serve with aioquic, layout CIDs, load reports, drain and resume), ``exec`` (``steerd
exec``: any server, sockets passed the systemd way) and ``asgi`` (hypercorn with layout
CIDs). Nothing here needs privilege or imports the daemon.
"""
