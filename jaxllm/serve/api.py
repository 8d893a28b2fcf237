"""The OpenAI API over the serving engine: /v1/models, /v1/completions and /v1/chat/completions as functions
from a request body to a response body, independent of the HTTP plumbing (server.py).

Compatibility notes: completions accept a string, a list of strings, a list of token ids or a list of such
lists (what lm-evaluation-harness's local-completions model sends); a string prompt is encoded with a bos
token in front, so with `echo` its first token's logprob is that given bos, while a token-id prompt is
used as is and its first logprob is null, as OpenAI reports it. `logprobs` (completions) and
`logprobs`/`top_logprobs` (chat) report the model's own distribution, each token shown as the text it adds
(logprobs.py), so `text_offset` indexes into the returned text; an echoed prompt is the prompt as the model
read it (its tokens decoded: the same text unless the tokenizer normalised it). Non-standard fields `top_k`,
and the server's template for chat. Bad requests raise RequestError, which becomes a 4xx JSON error in
OpenAI's shape.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid

from jaxllm.data.templates import ChatTemplate, encode_prompt, get_template, stop_markers
from jaxllm.model.generate import Completion, SamplingParams
from jaxllm.serve.engine import Engine, Job
from jaxllm.serve.logprobs import chat_logprobs, legacy_logprobs


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

    def __init__(self, engine: Engine, model_name: str, template: ChatTemplate | str = "chat",
                 default_max_tokens: int = 256):
        self.engine, self.model_name, self.template = engine, model_name, get_template(template)
        self.default_max_tokens, self.created = default_max_tokens, int(time.time())
        self.tok, self.cfg = engine.tokenizer, engine.cfg
        self.eos_ids = (self.tok.eos_id,) if self.tok.eos_id >= 0 else ()     # a row ends at the tokenizer's eos
        # A chat answer also ends at the template's end marker, or where the model opens the next user turn.
        self.chat_stop_ids, self.chat_stops = stop_markers(self.template, self.tok)

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
            rows = [bos + self.tok.encode(p) for p in texts]
            return rows, [self.tok.decode(r) for r in rows], False
        rows = [prompt] if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt) else prompt
        if (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for r in rows for t in r)):
            return [list(r) for r in rows], [self.tok.decode(r) for r in rows], True
        raise RequestError(400, f"'prompt' must be a string, a list of strings, a list of token ids in "
                           f"[0, {vocab}) or a list of such lists", "prompt")

    # --- /v1/completions ------------------------------------------------------------------------------
    def completions(self, body: dict, send_event=None) -> dict:
        """The response body; a streamed response goes through send_event, and only its usage is returned."""
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
        prompt_tokens = sum(len(r) for r in rows)
        if stream:
            results = self._stream(job, send_event, lambda i, delta, finish: {**head, "choices": [
                {"index": i, "text": delta, "logprobs": None, "finish_reason": finish}]},
                prefix=[prompt_texts[i // n] if echo else "" for i in range(len(rows) * n)])
            return {"usage": usage(prompt_tokens, results)}
        results: list[Completion] = job.result()
        choices = []
        for i, c in enumerate(results):
            r = i // n
            logprobs = None
            if n_top is not None:
                lps, tops = list(c.logprobs), list(c.top_logprobs)
                first = len(rows[r])
                if echo:
                    first = 0 if as_tokens or self.tok.bos_id < 0 else 1      # the bos we added is not echoed
                    lps = scored[r]["logprobs"][first:] + lps
                    tops = scored[r]["top_logprobs"][first:] + tops
                logprobs = legacy_logprobs(self.tok, rows[r] + list(c.tokens), first, lps, tops, n_top)
            text = (prompt_texts[r] if echo else "") + c.text
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**head, "choices": choices, "usage": usage(prompt_tokens, results)}

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

    def chat(self, body: dict, send_event=None) -> dict:
        """As `completions`: the response body, or only the usage of a streamed one."""
        self._check_model(body)
        messages = self._messages(body)
        ids = encode_prompt(messages, self.template, self.tok)
        stops = _stop_strings(body) + self.chat_stops
        want_lp = _field(body, "logprobs", bool, False)
        n_top = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
        stream = _field(body, "stream", bool, False)
        sps = self._sampling_per_choice(body, len(ids), None, self.chat_stop_ids, stops)
        job = self.engine.submit("generate", [(ids, sp) for sp in sps])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name}
        if stream:
            chunk = {**head, "object": "chat.completion.chunk"}
            for i in range(len(sps)):
                send_event({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            results = self._stream(job, send_event, lambda i, delta, finish: {**chunk, "choices": [
                {"index": i, "delta": {"content": delta} if delta else {}, "logprobs": None, "finish_reason": finish}]})
            return {"usage": usage(len(ids), results)}
        results: list[Completion] = job.result()
        choices = []
        for i, c in enumerate(results):
            logprobs = None
            if want_lp:
                logprobs = chat_logprobs(self.tok, ids, c.tokens, c.logprobs, c.top_logprobs, n_top)
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**head, "choices": choices, "usage": usage(len(ids), results)}

    @staticmethod
    def _stream(job: Job, send_event, make_chunk, prefix=None) -> list[Completion]:
        """Turns the engine's token events into chunks of new text per choice, then a final chunk each;
        returns the completions."""
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
                return payload[0]
            i, text, _, _ = payload
            last = sent.get(i, "")
            if text.startswith(last) and len(text) > len(last):   # text only grows: held-back tails are not sent
                send_event(make_chunk(i, text[len(last):], None))
                sent[i] = text


def usage(prompt_tokens: int, results: list[Completion]) -> dict:
    completion_tokens = sum(len(c.tokens) for c in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
