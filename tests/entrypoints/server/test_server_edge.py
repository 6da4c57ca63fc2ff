"""The edge guard of a real server: the Host allow-list of keyless servers (DNS rebinding), and a 500
that answers in the OpenAI format and leaves the keep-alive connection usable."""

from __future__ import annotations

import httpx
import pytest
from server_faults import FAULT_PATH
from test_server_errors import assert_error

from loom.entrypoints.server.config import ServerConfig
from loom.entrypoints.server.edge import HostAllowList, host_name
from loom.errors import InvalidRequest


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8000", "localhost"),
        ("LocalHost.", "localhost"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("models.internal", "models.internal"),
        ("::1", None),  # an IPv6 address needs brackets in a Host header
        ("[::1]x", None),
        ("localhost:", None),
        ("localhost:80:80", None),
        ("", None),
    ],
)
def test_host_name_parses_ports_and_brackets(header, name):
    assert host_name(header) == name


def test_allow_list_rules():
    hosts = HostAllowList(("models.internal", ".corp.example"), bind_host="box.lan")
    allowed = ["localhost", "a.localhost:1", "127.0.0.2", "[::1]:9", "10.1.2.3:8000", "[fe80::1]",
               "models.internal:80", "x.corp.example", "a.b.corp.example", "BOX.LAN:8000", None]  # fmt: skip
    refused = ["evil.example", "127.0.0.1.evil.example", "corp.example", "models.internal.evil.example",
               "localhost.evil.example", "box.lan.evil", "0x7f.1", "::1"]  # fmt: skip
    assert [h for h in allowed if not hosts.allows(h)] == []
    assert [h for h in refused if hosts.allows(h)] == []


def test_allowed_hosts_config():
    assert ServerConfig(allowed_hosts="*").host_allow_list() is None
    assert ServerConfig(allowed_hosts=" a.example, *.b.example ").host_allow_list() == (
        "a.example",
        ".b.example",
    )
    assert ServerConfig().host_allow_list() == ()
    for bad in ("a.example:8000", "a.*.example", "http://a.example", "[::1]"):
        with pytest.raises(InvalidRequest) as e:
            ServerConfig(allowed_hosts=f"ok.example,{bad}")
        assert e.value.param == "allowed_hosts"


def _get(server, path: str, host: str) -> httpx.Response:
    return httpx.get(server.url + path, headers={"Host": host, **server.headers}, timeout=10)


def test_keyless_server_refuses_foreign_host_headers(limited_server):
    """A page on evil.example rebinding its name to 127.0.0.1 sends `Host: evil.example:<port>`."""
    port = limited_server.port
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", f"localhost.evil.example:{port}"):
        for path in ("/v1/models", "/health", "/metrics"):
            error = assert_error(_get(limited_server, path, host), 400, code="host_not_allowed")
            assert "--allowed-hosts" in error["message"]
        resp = httpx.post(
            limited_server.url + "/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"Host": host},
            timeout=10,
        )
        assert_error(resp, 400, code="host_not_allowed")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST.", "app.localhost"):
        assert _get(limited_server, "/v1/models", host).status_code == 200, host


def test_allowed_hosts_flag_extends_the_list(edge_server):
    for host in ("models.internal", "models.internal:8000", "gpu1.corp.example"):
        assert _get(edge_server, "/v1/models", host).status_code == 200, host
    for host in ("corp.example", "evil.example"):
        assert_error(_get(edge_server, "/v1/models", host), 400, code="host_not_allowed")


def test_a_server_with_a_key_does_not_check_host(server):
    """A rebinding page cannot send the key, so the key is the defence there."""
    assert _get(server, "/v1/models", "evil.example").status_code == 200


def test_unexpected_error_is_a_500_that_keeps_the_connection(edge_server):
    """The fault route raises an exception no handler knows; the same keep-alive connection (the same
    client port) must then carry the next request."""
    with httpx.Client(base_url=edge_server.url, timeout=30) as http:

        def local_port(resp: httpx.Response) -> int:
            return resp.extensions["network_stream"].get_extra_info("client_addr")[1]

        first = http.get("/v1/models")
        assert first.status_code == 200
        failed = http.get(FAULT_PATH)
        error = assert_error(failed, 500)
        assert error == {
            "message": "internal server error",  # no details of our bug leak to the client
            "type": "internal_server_error",
            "param": None,
            "code": None,
        }
        assert failed.headers.get("connection", "").lower() != "close"
        after = http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
        assert local_port(first) == local_port(failed) == local_port(after)
    assert "injected fault" in edge_server.log.read_text()  # logged with its traceback, once
    assert edge_server.log.read_text().count("RuntimeError: injected fault") == 1
