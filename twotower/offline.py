"""Nothing leaves the machine: usage reporting off, and an optional guard that proves it.

Feast 0.31 posts usage telemetry to a public endpoint from every process that imports
it unless ``FEAST_USAGE=False`` is set before the import (offline, those posts block in
DNS and hold the process at exit). The package sets it on import, which happens before
any of its modules import Feast: in the CLI, the tests, the notebooks and Triton's
executor model (its ``model.py`` imports this package), and the environment of every
``tritonserver`` the recipe starts inherits it.

``TWOTOWER_EGRESS_LOG=<file>`` turns on a guard in every Python process that imports
the package: any attempt to resolve or connect to a non-loopback address is refused
(``OSError``) and appended to that file, so a test can assert the file stays empty.
"""

from __future__ import annotations

import ipaddress
import os
import sys

# FEAST_FORCE_USAGE_UUID: with usage off, Feast still writes an installation id to
# ~/.feast/usage and prints a notice that it "collects" usage statistics on its first import;
# a fixed id skips both, so nothing in the output suggests data leaves the machine.
TELEMETRY_OFF = {"FEAST_USAGE": "False", "FEAST_FORCE_USAGE_UUID": "telemetry-off"}
EGRESS_LOG_ENV = "TWOTOWER_EGRESS_LOG"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def disable_telemetry() -> None:
    """Force usage reporting off (a user's ``FEAST_USAGE=True`` is overridden on purpose)."""
    os.environ.update(TELEMETRY_OFF)


def is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(log_path: str):
    def audit(event: str, args: tuple) -> None:
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect":
            address = args[1]
            if not isinstance(address, tuple):  # AF_UNIX paths stay on the machine
                return
            host = address[0]
        else:
            return
        if is_loopback(host):
            return
        with open(log_path, "a") as log:
            log.write(f"pid {os.getpid()} {' '.join(sys.argv[:2])}: {event} {host!r}\n")
        raise OSError(f"twotower egress guard: {event} to {host!r} refused (only loopback is allowed)")

    return audit


def install_egress_guard_from_environment() -> None:
    log_path = os.environ.get(EGRESS_LOG_ENV)
    if log_path:
        sys.addaudithook(_guard(log_path))
