"""A free TCP port on this machine, for servers this process starts (a local Ray's GCS, test servers)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's choice); another process may still take it before use."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
