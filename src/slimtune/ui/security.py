"""Who may reach the app: loopback by default; any other address only with a password.

    --host 127.0.0.1 (default), ::1, localhost   no password needed: only this machine
    --host 0.0.0.0 or a LAN address                 refused unless --auth USER:PASSWORD
                                                    (or --auth-file FILE holding that line)

The password is compared in constant time. Uploads are capped (--max-upload-mb); they are
read as JSON lines or text only, never executed or unpickled.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from slimtune.errors import SlimtuneError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def parse_auth(text: str, source: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise SlimtuneError(f"{source}: give USER:PASSWORD (both non-empty)")
    return user, password


def read_auth(auth: str | None, auth_file: str | None) -> tuple[str, str] | None:
    """(user, password) from --auth or --auth-file, or None."""
    if auth and auth_file:
        raise SlimtuneError("give --auth or --auth-file, not both")
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise SlimtuneError(f"--auth-file {auth_file} does not exist")
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        return parse_auth(lines[0] if lines else "", f"--auth-file {auth_file}")
    return parse_auth(auth, "--auth") if auth else None


def check_host(host: str, credentials: tuple[str, str] | None) -> None:
    """Refuse to serve beyond this machine without a password."""
    if not is_loopback(host) and credentials is None:
        raise SlimtuneError(
            f"--host {host} makes the app reachable from other machines: "
            "add --auth USER:PASSWORD (or --auth-file FILE), or keep the default 127.0.0.1"
        )


def password_check(credentials: tuple[str, str]):
    """Gradio's auth callback: (user, password) -> bool, compared in constant time."""
    user, password = credentials

    def check(given_user: str, given_password: str) -> bool:
        same_user = hmac.compare_digest(given_user.encode(), user.encode())
        return hmac.compare_digest(given_password.encode(), password.encode()) and same_user

    return check
