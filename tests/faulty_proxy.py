"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real OpenAI-compatible server (tests only).

Each distinct request body goes through a scripted list of faults before it is forwarded: 401 (no or a wrong
key), 429 with a short Retry-After, 500, or a connection dropped without any response. Bodies containing a marker
can be made to fail forever. Attempts per body are counted, so tests can check that retries are bounded.
`edit_reply(request, reply)` rewrites the real server's JSON reply before it is returned (a faulty judge: NaN or
string logprobs, which no real server here produces), and the Authorization header of every request is recorded
(`authorizations`), so tests can see which key reached the server.
"""

from __future__ import annotations

import collections
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler

from loopback_server import LoopbackServer


class FaultyProxy(LoopbackServer):
    def __init__(self, upstream: str, faults=("429", "500", "drop"), always_fail_marker: str | None = None,
                 edit_reply=None):
        self.upstream = upstream.rstrip("/")
        self.edit_reply = edit_reply
        self.authorizations: list[str | None] = []
        self.faults = list(faults)
        self.always_fail_marker = always_fail_marker
        self.attempts: collections.Counter[bytes] = collections.Counter()
        self.forwarded = 0
        self._lock = threading.Lock()
        self._start_server()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    proxy.authorizations.append(self.headers.get("Authorization"))
                    proxy.attempts[body] += 1
                    attempt = proxy.attempts[body]
                marker = proxy.always_fail_marker
                if marker and marker.encode() in body:
                    fault = "500"
                elif attempt <= len(proxy.faults):
                    fault = proxy.faults[attempt - 1]
                else:
                    fault = None
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()  # no status line at all: the client sees a dropped connection
                    return
                if fault in ("401", "429", "500"):
                    payload = b'{"error": {"message": "injected fault", "type": "test"}}'
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("retry-after-ms", "20")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                request = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as response:
                    payload = response.read()
                if proxy.edit_reply is not None:
                    # edit_reply(request, reply) -> reply; a NaN stays a JSON NaN
                    payload = json.dumps(proxy.edit_reply(json.loads(body), json.loads(payload))).encode()
                with proxy._lock:
                    proxy.forwarded += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler
