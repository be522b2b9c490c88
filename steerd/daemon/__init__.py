"""The daemon: what runs as root (``steerd run``).

``service`` (the Daemon: start-up order, groups, classifier processes, ``run``/``status``/
``purge``), ``config``, ``control`` (the control socket's server side), ``registry`` (apps,
claims, slots, the decision), ``classifier`` and ``pool`` (first flights, in one or several
processes), ``reinject``, ``metrics``, and ``dataplane`` (the BPF programs in bpf/,
loaded, pinned and driven).
"""
