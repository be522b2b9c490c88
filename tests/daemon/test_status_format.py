"""``steerd status``'s table: each generation's CID mode, and how its packets were steered."""

from __future__ import annotations

from steerd.daemon.service import format_status


def test_status_table_shows_the_mode_and_the_steering_figures() -> None:
    status = {
        "listen": ["198.18.0.2"], "port": 443, "apps": [
            {"app": "web", "generations": [{
                "generation": 1, "state": "active", "alpn": ["h3"], "server_names": ["*"],
                "cid_mode": "layout", "workers": [{"slot": 0, "steering": {}}]}]},
            {"app": "plain", "generations": [{
                "generation": 2, "state": "active", "alpn": ["h3x"], "server_names": ["*"],
                "cid_mode": "learned", "cid_len": 8,
                "workers": [{"slot": 1, "steering": {"egress_learned": 3,
                                                     "steered_learned_cid": 40}},
                            {"slot": 2, "steering": {"egress_learned": 2}}]}]},
        ],
    }
    lines = format_status(status).splitlines()
    web = next(line for line in lines if line.startswith("web "))
    plain = next(line for line in lines if line.startswith("plain "))
    assert "layout" in web.split() and web.split()[-1] == "0"
    assert "learned/8" in plain.split() and plain.split()[-2:] == ["1", "2"]
    detail = lines[lines.index(plain) + 1]
    assert detail.split() == ["egress_learned=5", "steered_learned_cid=40"]  # summed, sorted
    assert lines[lines.index(web) + 1] != detail  # no figures line for a quiet generation
