"""The network policy's pure parts: patterns, targets, decisions, always-refused addresses,
what the presets expand to from configuration text, and the egress proxy's head parser."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.daemon.egress import MAX_HEAD, BadRequest, parse_head, response
from mvm.errors import InvalidArgument
from mvm.policy import network as N

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.isdigit()
)
names = st.lists(label, min_size=2, max_size=4).map(".".join)
ports = st.integers(min_value=1, max_value=65535)


def pol(*allow: str, preset: str = "dev") -> N.Policy:
    return N.make_policy(preset, list(allow))


def allowed(policy: N.Policy, target: str, default_port: int = 443) -> bool:
    return N.decide(policy, N.parse_target(target, default_port)).allowed


# -- parsing ---------------------------------------------------------------------------


@given(names, st.none() | ports, st.booleans())
def test_pattern_round_trips(name: str, port: int | None, wildcard: bool) -> None:
    text = ("*." if wildcard else "") + name + (f":{port}" if port else "")
    p = N.parse_pattern(text)
    assert str(p) == text
    assert N.parse_pattern(str(p)) == p
    assert p.port == port and p.wildcard == wildcard


@given(st.text(max_size=300))
def test_parse_pattern_never_crashes(text: str) -> None:
    """Any string is either a pattern or an InvalidArgument, never another exception."""
    try:
        p = N.parse_pattern(text)
    except InvalidArgument:
        return
    assert N.parse_pattern(str(p)) == p


@given(st.text(max_size=300), st.none() | ports)
def test_parse_target_never_crashes(text: str, default: int | None) -> None:
    try:
        t = N.parse_target(text, default)
    except InvalidArgument:
        return
    assert 1 <= t.port <= 65535
    assert t.host == t.host.lower()


@pytest.mark.parametrize(
    "bad",
    ["", "*", "*.org", "a.*.org", "exa mple.org", "host:0", "host:65536", "host:-1",
     "host:8o", "[::1", "-bad.org", "ex..org", "1.2.3", "a" * 300, "[::1]x"],
)  # fmt: skip
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        N.parse_pattern(bad)


def test_ip_patterns() -> None:
    assert N.parse_pattern("198.51.100.2:8080").ip == ipaddress.ip_address("198.51.100.2")
    assert str(N.parse_pattern("[2001:db8::1]:8443")) == "[2001:db8::1]:8443"
    assert N.parse_pattern("2001:db8::1").port is None
    # An IPv4-mapped IPv6 address is the IPv4 address.
    assert N.parse_ip("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")


def test_unknown_preset_and_too_many_patterns() -> None:
    with pytest.raises(InvalidArgument, match="unknown network preset"):
        N.make_policy("open", [])
    with pytest.raises(InvalidArgument, match="too many"):
        N.make_policy("dev", [f"h{i}.example.org" for i in range(N.MAX_PATTERNS + 1)])


# -- decisions ---------------------------------------------------------------------------


@given(names, ports)
def test_exact_name_allows_only_that_name_and_port(name: str, port: int) -> None:
    p = pol(f"{name}:{port}")
    assert allowed(p, f"{name}:{port}")
    assert allowed(p, f"{name.upper()}.:{port}")  # case and trailing dot do not matter
    assert not allowed(p, f"x{name}:{port}")
    assert not allowed(p, f"sub.{name}:{port}")
    assert not allowed(p, f"{name}:{port % 65535 + 1}")


@given(names, label)
def test_wildcard_matches_subdomains_not_the_bare_domain(name: str, sub: str) -> None:
    p = pol(f"*.{name}")
    assert allowed(p, f"{sub}.{name}:443")
    assert allowed(p, f"a.{sub}.{name}:80")
    assert not allowed(p, f"{name}:443")
    assert not allowed(p, f"{sub}{name}:443")  # no dot: another domain
    assert not allowed(p, f"{sub}.{name}:8080")  # default ports only


def test_default_ports_are_80_and_443() -> None:
    p = pol("example.org")
    assert allowed(p, "example.org:80") and allowed(p, "example.org:443")
    assert not allowed(p, "example.org:22")


def test_presets() -> None:
    assert not allowed(pol(preset="none"), "example.org:443")
    assert not allowed(pol(preset="registries"), "example.org:443")
    assert allowed(pol(preset="unrestricted"), "example.org:443")
    assert allowed(pol(preset="unrestricted"), "example.org:22")
    assert N.decide(pol(preset="unrestricted"), N.parse_target("a.b:1")).rule == (
        "preset:unrestricted"
    )
    assert not N.make_policy("none", []).enabled
    assert N.make_policy("none", ["a.example.org"]).enabled
    assert N.make_policy("unrestricted", []).enabled


def test_raw_ip_needs_that_exact_ip_even_unrestricted() -> None:
    d = N.decide(pol(preset="unrestricted"), N.parse_target("198.51.100.2:8080"))
    assert not d.allowed and d.rule == "raw-ip"
    assert allowed(pol("198.51.100.2:8080"), "198.51.100.2:8080")
    assert not allowed(pol("198.51.100.2:8080"), "198.51.100.3:8080")
    # A name pattern never matches an address, an address pattern never a name.
    assert not allowed(pol("198.51.100.2"), "example.org:443")
    assert allowed(pol("[2001:db8::1]:443"), "[2001:db8::1]:443")


@pytest.mark.parametrize(
    "addr",
    ["127.0.0.1", "127.1.2.3", "169.254.169.254", "169.254.0.1", "0.0.0.0", "10.0.2.2",
     "10.0.2.100", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "ff02::1",
     "::ffff:127.0.0.1", "::ffff:169.254.169.254"],
)  # fmt: skip
def test_always_refused_addresses(addr: str) -> None:
    assert N.address_refusal(ipaddress.ip_address(addr)) is not None


@pytest.mark.parametrize("addr", ["198.51.100.2", "93.184.216.34", "10.1.2.3", "2001:db8::1"])
def test_ordinary_addresses_pass(addr: str) -> None:
    assert N.address_refusal(ipaddress.ip_address(addr)) is None


def test_host_own_addresses_are_refused() -> None:
    own = {ipaddress.ip_address("192.0.2.7")}
    assert N.address_refusal(ipaddress.ip_address("192.0.2.7"), own) is not None
    assert N.address_refusal(ipaddress.ip_address("192.0.2.8"), own) is None


@given(st.ip_addresses())
def test_refusal_covers_every_loopback_link_local_multicast(addr: N.IPAddress) -> None:
    bad = addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified
    if bad:
        assert N.address_refusal(addr) is not None


# -- presets from configuration text ---------------------------------------------------------


def test_pip_index_urls_from_config_and_env() -> None:
    conf = "[global]\nindex-url = https://pkgs.example.org/simple\n"
    conf2 = "[install]\nextra-index-url =\n  https://extra.example.org:8443/simple\n  ftp://x\n"
    env = {"PIP_EXTRA_INDEX_URL": "http://env.example.org/simple"}
    urls = N.pip_index_urls([conf, conf2, "not [ini"], env)
    assert urls == [
        "https://pkgs.example.org/simple",
        "https://extra.example.org:8443/simple",
        "http://env.example.org/simple",
    ]


def test_registry_patterns() -> None:
    pats = N.registry_patterns(
        ["http://deb.example.org/debian", "https://deb.example.org/debian-security"],
        ["https://idx.example.org:8443/simple"],
        ["ignored.example.org"],
    )
    assert [str(p) for p in pats] == ["deb.example.org", "idx.example.org:8443"]
    # pip's own default only when no index is configured
    pats = N.registry_patterns([], [], ["pypi.example.org", "files.example.org"])
    assert [str(p) for p in pats] == ["pypi.example.org", "files.example.org"]


def test_dev_patterns() -> None:
    assert [str(p) for p in N.dev_patterns('[dev]\nallow = ["*.corp.example:8443"]\n')] == [
        "*.corp.example:8443"
    ]
    assert N.dev_patterns("") == []
    with pytest.raises(InvalidArgument):
        N.dev_patterns("[dev]\nallow = 3\n")
    with pytest.raises(InvalidArgument):
        N.dev_patterns("[dev")


def test_resolve_override() -> None:
    r = N.parse_resolve_override("allowed.test=198.51.100.2, Rebind.test=127.0.0.1,x.test=::1")
    assert r["allowed.test"] == [ipaddress.ip_address("198.51.100.2")]
    assert r["rebind.test"] == [ipaddress.ip_address("127.0.0.1")]
    assert r["x.test"] == [ipaddress.ip_address("::1")]
    with pytest.raises(InvalidArgument):
        N.parse_resolve_override("name-without-ip")


def test_proc_parsers() -> None:
    fib = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 192.0.2.7
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
"""
    assert N.parse_fib_trie_local(fib) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("192.0.2.7"),
    }
    v6 = "00000000000000000000000000000001 01 80 10 80       lo\n"
    assert N.parse_if_inet6(v6) == {ipaddress.ip_address("::1")}
    # this host's own addresses include loopback
    assert ipaddress.ip_address("127.0.0.1") in N.host_addresses()


# -- the proxy's request-head parser (pure) ---------------------------------------------------


def test_parse_connect() -> None:
    r = parse_head(b"CONNECT Pypi.Example.org:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.method == "CONNECT" and r.upstream_head is None
    assert (r.target.host, r.target.port, r.target.ip) == ("pypi.example.org", 443, None)


def test_parse_absolute_http_rewrites_to_origin_form() -> None:
    head = (
        b"GET http://allowed.test:8080/a/b?q=1 HTTP/1.1\r\nHost: allowed.test:8080\r\n"
        b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
        b"Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    r = parse_head(head)
    assert (r.target.host, r.target.port) == ("allowed.test", 8080)
    assert r.upstream_head == (
        b"GET /a/b?q=1 HTTP/1.1\r\nHost: allowed.test:8080\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )
    r = parse_head(b"HEAD http://a.example.org?x HTTP/1.0\r\n\r\n")
    assert r.target.port == 80
    assert (
        r.upstream_head == b"HEAD /?x HTTP/1.0\r\nHost: a.example.org\r\nConnection: close\r\n\r\n"
    )
    r = parse_head(b"GET http://198.51.100.2:8080/ HTTP/1.1\r\n\r\n")
    assert r.target.ip is not None


@pytest.mark.parametrize(
    "head",
    [b"GARBAGE\r\n\r\n", b"GET /relative HTTP/1.1\r\n\r\n", b"GET https://a.example.org/ HTTP/1.1\r\n\r\n",
     b"CONNECT a.example.org HTTP/1.1\r\n\r\n", b"CONNECT a.example.org:0 HTTP/1.1\r\n\r\n",
     b"GET http://u:p@a.example.org/ HTTP/1.1\r\n\r\n", b"get http://a.example.org/ HTTP/1.1\r\n\r\n",
     b"GET http://a.example.org/ HTTP/2\r\n\r\n", b"GET http://a.example.org/ HTTP/1.1\r\nbad\r\n\r\n",
     "GET http://\u00e9.org/ HTTP/1.1\r\n\r\n".encode(), b"GET http://a b/ HTTP/1.1\r\n\r\n"],
)  # fmt: skip
def test_bad_heads_are_refused(head: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        parse_head(head)
    assert e.value.status == 400


def test_oversized_head() -> None:
    with pytest.raises(BadRequest) as e:
        parse_head(b"GET http://a.example.org/" + b"a" * MAX_HEAD + b" HTTP/1.1\r\n\r\n")
    assert e.value.status == 431


@given(st.binary(max_size=2000))
def test_parse_head_never_crashes(head: bytes) -> None:
    """Whatever the guest sends, the parser answers a request or a BadRequest."""
    try:
        r = parse_head(head)
    except BadRequest as e:
        assert e.status in (400, 431)
        return
    assert 1 <= r.target.port <= 65535
    if r.upstream_head is not None:
        assert r.upstream_head.endswith(b"Connection: close\r\n\r\n")


@given(st.sampled_from(["GET", "POST", "PUT"]), names, st.none() | ports, st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-._~%=&?", max_size=40))  # fmt: skip
def test_parse_head_absolute_urls(method: str, name: str, port: int | None, path: str) -> None:
    auth = name + (f":{port}" if port else "")
    r = parse_head(f"{method} http://{auth}/{path} HTTP/1.1\r\nX-A: 1\r\n\r\n".encode())
    assert (r.target.host, r.target.port) == (name, port or 80)
    assert r.upstream_head is not None
    assert r.upstream_head.startswith(f"{method} /{path} HTTP/1.1\r\n".encode())
    assert f"\r\nHost: {auth}\r\n".encode() in r.upstream_head


def test_response_is_a_complete_http_message() -> None:
    data = response(403, "Forbidden by mvm egress policy", "mvm egress proxy: no\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden by mvm egress policy\r\n")
    assert b"X-Mvm-Egress: denied" in head and f"Content-Length: {len(body)}".encode() in head
