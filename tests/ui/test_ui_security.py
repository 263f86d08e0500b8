"""Loopback by default; any other host only with a password; the password is checked."""

from __future__ import annotations

import pytest

from slimtune.errors import SlimtuneError
from slimtune.ui.security import check_host, is_loopback, password_check, read_auth


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_password(host):
    assert is_loopback(host)
    check_host(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_other_hosts_are_refused_without_a_password(host):
    assert not is_loopback(host)
    with pytest.raises(SlimtuneError, match=f"--host {host} .* add --auth USER:PASSWORD"):
        check_host(host, None)
    check_host(host, ("ann", "s3cret"))


def test_auth_is_parsed_from_the_flag_or_a_file(tmp_path):
    assert read_auth("ann:s3:cret", None) == ("ann", "s3:cret")
    (tmp_path / "pass.txt").write_text("bob:pw\n")
    assert read_auth(None, str(tmp_path / "pass.txt")) == ("bob", "pw")
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(SlimtuneError, match="--auth: give USER:PASSWORD"):
            read_auth(bad, None)
    with pytest.raises(SlimtuneError, match="does not exist"):
        read_auth(None, str(tmp_path / "missing"))
    assert read_auth(None, None) is None


def test_password_check_accepts_only_the_pair():
    check = password_check(("ann", "s3cret"))
    assert check("ann", "s3cret")
    assert not check("ann", "s3cre") and not check("bob", "s3cret") and not check("", "")
