"""A Docker plugin's transport: HTTP POSTs of JSON on a unix socket, one thread each.
An answer that is an error carries it both as "Err" (the network driver's field) and as
"Error" (the IPAM driver's): Docker reads the one of the call, and shows it in one line."""
from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler

from xoverlay.errors import XoError

log = logging.getLogger("xoverlay.docker")
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handle_call = None      # (call, body) -> dict


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        call = self.path.lstrip("/")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else {}
            answer, status = self.server.handle_call(call, body if isinstance(body, dict) else {}), 200
        except KeyError:
            answer, status = {"Err": f"{call}: not implemented by xoverlay"}, 404
        except XoError as e:
            log.error("%s: %s", call, e)
            answer, status = {"Err": str(e), "Error": str(e)}, 200
        except Exception as e:
            log.exception("%s failed", call)
            answer, status = {"Err": f"xoverlay: {e}", "Error": f"xoverlay: {e}"}, 200
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        log.debug("plugin: " + fmt, *args)


def serve(path: str, handle_call) -> _Server:
    """Listen on `path` (made anew: a socket left by a dead agent is ours to replace) and
    serve in a thread; shutdown() and close() stop it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    server = _Server(path, _Handler)
    server.handle_call = handle_call
    threading.Thread(target=server.serve_forever, name="docker-plugin", daemon=True).start()
    return server


def close(server: _Server) -> None:
    server.shutdown()
    server.server_close()
    try:
        os.unlink(server.server_address)
    except OSError:
        pass
