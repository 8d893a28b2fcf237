"""An OpenAI-compatible HTTP server over a jaxllm checkpoint (the API itself is api.py).

Standard library only (ThreadingHTTPServer): each connection gets a thread that parses and validates its
request, then hands the token rows to one engine thread that owns the model (engine.py). The engine takes
whatever requests are waiting (up to max_batch rows) and runs them as one batch through `generate`, so
concurrent clients share each decode step. Streaming responses are Server-Sent Events, as OpenAI sends them.
Bad requests get a 4xx JSON error in OpenAI's shape; nothing a client sends stops the server.

With an API key, every /v1 request needs `Authorization: Bearer <key>` (else 401, as OpenAI answers);
/health stays open for load balancers. Each request is logged in one line: client, method, path, status,
prompt + completion tokens and latency.
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxllm.data.templates import ChatTemplate
from jaxllm.serve.api import OpenAIServer, RequestError
from jaxllm.serve.engine import Engine

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------
# HTTP plumbing.

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "jaxllm"

    def log_message(self, fmt, *args):          # the server's own messages (bad request lines) go to logging
        log.debug("%s " + fmt, self.address_string(), *args)

    def log_request(self, code="-", size="-"):  # replaced by the one line per request of _logged
        self._status = code

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _logged(self, handle) -> None:
        """Runs one request and logs it in one line: client, method, path, status, tokens, latency."""
        t0 = time.perf_counter()
        self._status, self._usage = "-", None
        try:
            handle()
        finally:
            u = self._usage
            tokens = f"tokens={u['prompt_tokens']}+{u['completion_tokens']}" if u else "tokens=-"
            log.info("%s %s %s %s %s %.3fs", self.address_string(), self.command, self.path.split("?")[0],
                     self._status, tokens, time.perf_counter() - t0)

    def _authorized(self, path: str) -> bool:
        """With an API key, /v1 requests need `Authorization: Bearer <key>`; otherwise answers 401."""
        key = self.server.api_key
        if not key or not path.startswith("/v1"):
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return True
        message = ("Incorrect API key provided" if given else
                   "Missing API key: send the header 'Authorization: Bearer <key>'")
        self.close_connection = True             # the body is left unread: do not reuse the connection
        self._send_json(401, RequestError(401, message, code="invalid_api_key").body(),
                        {"WWW-Authenticate": "Bearer", "Connection": "close"})
        return False

    def do_GET(self):
        self._logged(self._get)

    def do_POST(self):
        self._logged(self._post)

    def _get(self):
        app: OpenAIServer = self.server.app
        path = self.path.split("?")[0].rstrip("/")
        if not self._authorized(path):
            return
        if path == "/v1/models":
            self._send_json(200, app.models())
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            model = next((m for m in app.models()["data"] if m["id"] == name), None)
            self._send_json(200, model) if model else self._send_json(
                404, RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found").body())
        elif path in ("/health", ""):
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(404, RequestError(404, f"unknown path {self.path}").body())

    def _post(self):
        app: OpenAIServer = self.server.app
        path = self.path.split("?")[0].rstrip("/")
        if not self._authorized(path):
            return
        routes = {"/v1/completions": app.completions, "/v1/chat/completions": app.chat}
        streaming = {"started": False}

        def send_event(obj: dict) -> None:
            if not streaming["started"]:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")   # the stream ends when the connection does
                self.end_headers()
                self.close_connection = True
                streaming["started"] = True
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
            self.wfile.flush()

        try:
            if path not in routes:
                raise RequestError(404, f"unknown path {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                raise RequestError(413, f"request body over {MAX_BODY} bytes")
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(400, f"request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise RequestError(400, "request body must be a JSON object")
            result = routes[path](body, send_event)
            self._usage = result.get("usage")
            if streaming["started"]:                      # streamed: the result holds only the usage
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:
                self._send_json(200, result)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away during %s", path)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error, never a dead server
            err = e if isinstance(e, RequestError) else RequestError(500, f"internal error: {type(e).__name__}: {e}")
            if not isinstance(e, RequestError):
                log.exception("request to %s failed", path)
            if streaming["started"]:                      # headers are gone: report in-band, then close
                try:
                    self.wfile.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                except OSError:
                    pass
            else:
                try:
                    self._send_json(err.status, err.body())
                except OSError:
                    pass


class _HTTPServer(ThreadingHTTPServer):
    """Joins its connection threads on close, after shutting their sockets: a handler thread still alive at
    interpreter exit (a client's idle keep-alive connection) aborted the process ("terminate called ...",
    exit status 134) when the socket closed under it during finalisation."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address, handler, api_key: str | None, app: "OpenAIServer"):
        super().__init__(address, handler)
        self.api_key, self.app = api_key, app
        self._open, self._open_lock = set(), threading.Lock()

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        with self._open_lock:
            for request in self._open:
                try:
                    request.shutdown(socket.SHUT_RDWR)   # wakes a handler waiting for the next request
                except OSError:
                    pass
        super().server_close()                             # joins the handler threads


class Server:
    """The HTTP server plus its engine. `start()` serves from a background thread (tests, notebooks);
    `serve_forever()` blocks (the CLI)."""

    def __init__(self, params, cfg, tokenizer, *, model_name: str = "jaxllm", template: ChatTemplate | str = "chat",
                 host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, default_max_tokens: int = 256,
                 api_key: str | None = None):
        self.engine = Engine(params, cfg, tokenizer, max_batch=max_batch)
        self.app = OpenAIServer(self.engine, model_name, template, default_max_tokens)
        # api_key None or "": no authentication.
        self.httpd = _HTTPServer((host, port), _Handler, api_key or None, self.app)
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="jaxllm-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        log.info("serving %s at %s", self.app.model_name, self.url)
        try:
            self.httpd.serve_forever()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.engine.close()
