"""The few Docker Engine API reads the plugin needs: what Docker calls a network and a
container, which its plugin protocol never says (a network's name, a container's name)."""
from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

from xoverlay.errors import XoError

DEFAULT_HOST = "unix:///var/run/docker.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class DockerApi:
    def __init__(self, host: str = DEFAULT_HOST, timeout: float = 5.0):
        if not host.startswith("unix://"):
            raise XoError(f"Docker host {host!r}: only unix:// sockets are supported")
        self.path = host[len("unix://"):]
        self.timeout = timeout

    def get(self, path: str, **query) -> object:
        """GET `path`: its JSON; None for 404; XoError when Docker cannot be asked."""
        if query:
            path += "?" + urllib.parse.urlencode({k: json.dumps(v) if isinstance(v, dict) else v
                                                  for k, v in query.items()})
        conn = _UnixConnection(self.path, self.timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
        except OSError as e:
            raise XoError(f"Docker's API at {self.path}: {e}") from None
        finally:
            conn.close()
        if r.status == 404:
            return None
        if r.status != 200:
            raise XoError(f"Docker's API: GET {path}: {r.status} {body.decode(errors='replace').strip()}")
        return json.loads(body)

    def network(self, ident: str) -> dict | None:
        return self.get(f"/networks/{ident}")

    def networks(self, driver: str) -> list[dict]:
        return self.get("/networks", filters={"driver": [driver]}) or []

    def container(self, ident: str) -> dict | None:
        return self.get(f"/containers/{ident}/json")
