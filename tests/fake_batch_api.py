"""OpenAI's Batch API bookkeeping (files, batches) on 127.0.0.1, for tests only.

This is a fake because the Batch API cannot run here: no local server implements /v1/files and /v1/batches.
Only the bookkeeping is fake; every request in a batch is answered by a real OpenAI-compatible server
(llama.cpp serving the embedded model), so the judgments are real completions with real logprobs.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from email.parser import BytesParser
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler

from loopback_server import LoopbackServer


class FakeBatchAPI(LoopbackServer):
    def __init__(self, upstream: str, fail_marker: str | None = None):
        self.upstream = upstream.rstrip("/")
        self.fail_marker = fail_marker
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batches_created = 0
        self.release = threading.Event()  # batches stay in_progress until released
        self.release.set()
        self._lock = threading.Lock()
        self._start_server()

    def __exit__(self, *exc) -> None:
        self.release.set()  # a test that left the batch waiting must not hang the server thread
        super().__exit__(*exc)

    def _new_id(self, prefix: str, store: dict) -> str:
        return f"{prefix}-{len(store) + 1}"

    def _run_batch(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        self.release.wait()
        out = []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            request = json.loads(line)
            body = json.dumps(request["body"]).encode()
            if self.fail_marker and self.fail_marker in body.decode():
                out.append({"id": f"r-{request['custom_id']}", "custom_id": request["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "injected failure"}})
                continue
            upstream = urllib.request.Request(self.upstream + "/chat/completions", data=body,
                                              headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(upstream, timeout=120) as response:
                payload = json.loads(response.read())
            out.append({"id": f"r-{request['custom_id']}", "custom_id": request["custom_id"],
                        "response": {"status_code": 200, "request_id": "x", "body": payload}, "error": None})
        with self._lock:
            output_id = self._new_id("file", self.files)
            self.files[output_id] = "\n".join(json.dumps(line) for line in out).encode()
            batch.update(status="completed", output_file_id=output_id, completed_at=int(time.time()))

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj, raw: bytes | None = None):
                payload = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/files":
                    message = BytesParser(policy=default_policy).parsebytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                    parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                             for part in message.iter_parts()}
                    with api._lock:
                        file_id = api._new_id("file", api.files)
                        api.files[file_id] = parts["file"]
                    self._reply({"id": file_id, "object": "file", "bytes": len(parts["file"]),
                                 "created_at": int(time.time()), "filename": "input.jsonl", "purpose": "batch",
                                 "status": "processed"})
                elif self.path == "/v1/batches":
                    request = json.loads(body)
                    with api._lock:
                        batch_id = api._new_id("batch", api.batches)
                        api.batches_created += 1
                        api.batches[batch_id] = {
                            "id": batch_id, "object": "batch", "endpoint": request["endpoint"],
                            "input_file_id": request["input_file_id"], "completion_window": "24h",
                            "status": "in_progress", "created_at": int(time.time()), "output_file_id": None}
                    threading.Thread(target=api._run_batch, args=(batch_id,), daemon=True).start()
                    self._reply(api.batches[batch_id])
                else:
                    self.send_error(404)

            def do_GET(self):
                if self.path.startswith("/v1/batches/"):
                    self._reply(api.batches[self.path.rsplit("/", 1)[1]])
                elif self.path.startswith("/v1/files/") and self.path.endswith("/content"):
                    self._reply(None, raw=api.files[self.path.split("/")[3]])
                else:
                    self.send_error(404)

        return Handler
