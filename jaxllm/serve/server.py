"""An OpenAI-compatible HTTP server over a jaxllm checkpoint: /v1/models, /v1/completions, /v1/chat/completions.

Standard library only (ThreadingHTTPServer): each connection gets a thread that parses and validates its
request, then hands the token rows to one engine thread that owns the model (engine.py). The engine takes
whatever requests are waiting (up to max_batch rows) and runs them as one batch through `generate`, so
concurrent clients share each decode step. Streaming responses are Server-Sent Events, as OpenAI sends them.

Compatibility notes: completions accept a string, a list of strings, a list of token ids or a list of such
lists (what lm-evaluation-harness's local-completions model sends); a string prompt is encoded with a bos
token in front, so with `echo` its first token's logprob is that given bos, while a token-id prompt is
used as is and its first logprob is null, as OpenAI reports it. `logprobs` (completions) and
`logprobs`/`top_logprobs` (chat) report the model's own distribution. Non-standard fields `top_k`, and the
server's template for chat. Bad requests get a 4xx JSON error in OpenAI's shape; nothing a client sends
stops the server.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxllm.data.templates import encode_segments, get_template, render
from jaxllm.model.generate import Completion, SamplingParams
from jaxllm.serve.engine import Engine, Job

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024 * 1024


class RequestError(Exception):
    """A client error: becomes an HTTP status with OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------------
# Request validation.

def _field(body: dict, name: str, types, default=None, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(400, f"'{name}' must be {what or types}, got {value!r}", name)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise RequestError(400, f"'{name}' must be {what or types}, got {value!r}", name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    return tuple(s for s in stops if s)


class OpenAIServer:
    """Request handling, independent of the HTTP plumbing."""

    def __init__(self, engine: Engine, model_name: str, template: str = "chat", default_max_tokens: int = 256):
        self.engine, self.model_name, self.template = engine, model_name, get_template(template)
        self.default_max_tokens, self.created = default_max_tokens, int(time.time())
        self.tok, self.cfg = engine.tokenizer, engine.cfg
        self.eos_ids = (self.tok.eos_id,) if self.tok.eos_id >= 0 else ()     # a row ends at the tokenizer's eos

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "jaxllm", "max_model_len": self.cfg.max_seq_len}]}

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError(400, "'model' is required (a string)", "model")
        if model != self.model_name:
            raise RequestError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                               "model", "model_not_found")

    def _sampling_per_choice(self, body: dict, prompt_len: int, default_max: int | None, stop_ids,
                             stops) -> list[SamplingParams]:
        """One SamplingParams per requested choice (`n`) of a prompt of prompt_len tokens."""
        if prompt_len == 0:
            raise RequestError(400, "the prompt is empty (and the tokenizer has no bos token to start from)", "prompt")
        room = self.cfg.max_seq_len - prompt_len
        max_tokens = _field(body, "max_tokens", int, None, lambda v: v >= 0, "an integer >= 0")
        max_tokens = _field(body, "max_completion_tokens", int, max_tokens, lambda v: v >= 0, "an integer >= 0")
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise RequestError(400, f"This model's maximum context length is {self.cfg.max_seq_len} tokens; the "
                               f"prompt has {prompt_len} tokens and {max_tokens or 0} more were requested",
                               "messages" if default_max is None else "prompt", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(room, default_max or self.default_max_tokens)
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")
        seed = _field(body, "seed", int, None)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        sp = SamplingParams(max_new_tokens=max_tokens,
                            temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2,
                                                     "a number in [0, 2]")),
                            top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
                            top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1,
                                               "a number in (0, 1]")),
                            stop_ids=stop_ids, stop_strings=stops)
        # Choice j of a seeded request draws with seed + j: reproducible, and the choices differ.
        return [dataclasses.replace(sp, seed=(seed + j) % 2**32) for j in range(n)]

    def _prompts(self, prompt) -> tuple[list[list[int]], list[str], bool]:
        """(token rows, prompt texts, given as tokens?) from any prompt form the completions API accepts."""
        vocab = self.tok.vocab_size
        bos = [self.tok.bos_id] if self.tok.bos_id >= 0 else []
        texts = [prompt] if isinstance(prompt, str) else prompt
        if isinstance(texts, list) and texts and all(isinstance(p, str) for p in texts):
            return [bos + self.tok.encode(p) for p in texts], list(texts), False
        rows = [prompt] if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt) else prompt
        if (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for r in rows for t in r)):
            return [list(r) for r in rows], [self.tok.decode(r) for r in rows], True
        raise RequestError(400, f"'prompt' must be a string, a list of strings, a list of token ids in "
                           f"[0, {vocab}) or a list of such lists", "prompt")

    def _piece(self, token: int) -> str:
        return self.tok.id_to_piece(token).replace("\u2581", " ")

    def _legacy_logprobs(self, tokens, lps, tops, n_top) -> dict:
        pieces = [self._piece(t) for t in tokens]
        offsets, pos = [], 0
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        return {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [None if t is None else {self._piece(i): lp for i, lp in t[:n_top]} for t in tops]}

    # --- /v1/completions ------------------------------------------------------------------------------
    def completions(self, body: dict, send_event=None) -> dict | None:
        self._check_model(body)
        if "prompt" not in body:
            raise RequestError(400, "'prompt' is required", "prompt")
        rows, prompt_texts, as_tokens = self._prompts(body["prompt"])
        echo = _field(body, "echo", bool, False)
        n_top = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
        stream = _field(body, "stream", bool, False)
        stops = _stop_strings(body)
        choices_of_row = [self._sampling_per_choice(body, len(r), 16, self.eos_ids, stops) for r in rows]
        n = len(choices_of_row[0])
        job = self.engine.submit("generate", [(r, sp) for r, sps in zip(rows, choices_of_row) for sp in sps])
        scored = self.engine.submit("score", rows).result() if echo and n_top is not None else None
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        if stream:
            self._stream(job, send_event, lambda i, delta, finish: {**head, "choices": [
                {"index": i, "text": delta, "logprobs": None, "finish_reason": finish}]},
                prefix=[prompt_texts[i // n] if echo else "" for i in range(len(rows) * n)])
            return None
        results: list[Completion] = job.result()
        choices = []
        for i, c in enumerate(results):
            r = i // n
            logprobs = None
            if n_top is not None:
                tokens, lps, tops = list(c.tokens), list(c.logprobs), list(c.top_logprobs)
                if echo:
                    skip = 0 if as_tokens or self.tok.bos_id < 0 else 1      # the bos we added is not echoed
                    tokens = rows[r][skip:] + tokens
                    lps = scored[r]["logprobs"][skip:] + lps
                    tops = scored[r]["top_logprobs"][skip:] + tops
                logprobs = self._legacy_logprobs(tokens, lps, tops, n_top)
            text = (prompt_texts[r] if echo else "") + c.text
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        completion_tokens = sum(len(c.tokens) for c in results)
        prompt_tokens = sum(len(r) for r in rows)
        return {**head, "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}

    # --- /v1/chat/completions -------------------------------------------------------------------------
    def _messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise RequestError(400, f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):   # content parts: only text parts can be served
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise RequestError(400, f"messages[{i}].content: only text parts are supported",
                                       f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return out

    def chat(self, body: dict, send_event=None) -> dict | None:
        self._check_model(body)
        messages = self._messages(body)
        ids, _ = encode_segments(render(messages, self.template, add_generation_prompt=True), self.tok)
        # A model that starts the next user turn has finished its answer.
        turn_marker = self.template.user_format.split("{content}")[0].strip()
        stops = _stop_strings(body) + ((turn_marker,) if turn_marker else ())
        want_lp = _field(body, "logprobs", bool, False)
        n_top = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
        stream = _field(body, "stream", bool, False)
        sps = self._sampling_per_choice(body, len(ids), None, self.eos_ids, stops)
        job = self.engine.submit("generate", [(ids, sp) for sp in sps])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name}
        if stream:
            chunk = {**head, "object": "chat.completion.chunk"}
            for i in range(len(sps)):
                send_event({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            self._stream(job, send_event, lambda i, delta, finish: {**chunk, "choices": [
                {"index": i, "delta": {"content": delta} if delta else {}, "logprobs": None, "finish_reason": finish}]})
            return None
        results: list[Completion] = job.result()
        choices = []
        for i, c in enumerate(results):
            logprobs = None
            if want_lp:
                logprobs = {"content": [
                    {"token": self._piece(t), "logprob": lp, "bytes": list(self._piece(t).encode()),
                     "top_logprobs": [{"token": self._piece(a), "logprob": b, "bytes": list(self._piece(a).encode())}
                                      for a, b in top[:n_top]]}
                    for t, lp, top in zip(c.tokens, c.logprobs, c.top_logprobs)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        completion_tokens = sum(len(c.tokens) for c in results)
        return {**head, "choices": choices, "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                                                      "total_tokens": len(ids) + completion_tokens}}

    @staticmethod
    def _stream(job: Job, send_event, make_chunk, prefix=None) -> None:
        """Turns the engine's token events into chunks of new text per choice, then a final chunk each."""
        sent: dict[int, str] = {}
        for i, p in enumerate(prefix or []):
            if p:
                send_event(make_chunk(i, p, None))
        while True:
            kind, *payload = job.events.get(timeout=600)
            if kind == "error":
                raise payload[0]
            if kind == "done":
                for i, c in enumerate(payload[0]):
                    last = sent.get(i, "")
                    tail = c.text[len(last):] if c.text.startswith(last) else ""
                    send_event(make_chunk(i, tail, c.finish_reason or "length"))
                return
            i, text, _, _ = payload
            last = sent.get(i, "")
            if text.startswith(last) and len(text) > len(last):   # text only grows: held-back tails are not sent
                send_event(make_chunk(i, text[len(last):], None))
                sent[i] = text


# ----------------------------------------------------------------------------------------------------
# HTTP plumbing.

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "jaxllm"

    def log_message(self, fmt, *args):          # route access logs through logging, quietly
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        app: OpenAIServer = self.server.app
        path = self.path.split("?")[0].rstrip("/")
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

    def do_POST(self):
        app: OpenAIServer = self.server.app
        path = self.path.split("?")[0].rstrip("/")
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
            if result is None:                            # streamed
                send_event_done = b"data: [DONE]\n\n"
                self.wfile.write(send_event_done)
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


class Server:
    """The HTTP server plus its engine. `start()` serves from a background thread (tests, notebooks);
    `serve_forever()` blocks (the CLI)."""

    def __init__(self, params, cfg, tokenizer, *, model_name: str = "jaxllm", template: str = "chat",
                 host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, default_max_tokens: int = 256):
        self.engine = Engine(params, cfg, tokenizer, max_batch=max_batch)
        self.app = OpenAIServer(self.engine, model_name, template, default_max_tokens)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self.app
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
