"""The official `openai` client against `jaxllm serve` over loopback: models, completions (logprobs, echo),
chat, streaming, concurrent batching, and 4xx JSON errors that leave the server running."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.model.spec import init_params  # noqa: E402
from jaxllm.model.transformer import forward  # noqa: E402
from jaxllm.serve.server import Server  # noqa: E402
from jaxllm.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny-test"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    spm = SHARED_DATA / "tokenizers" / "sentencepiece_test" / "test_model.model"
    if not spm.exists():
        pytest.skip(f"{spm} is absent (developer and CI machines have it beside the checkout)")
    tok = Tokenizer(spm)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96, attention_impl="xla", init_std=0.1)
    params = init_params(cfg, jax.random.key(0))
    server = Server(params, cfg, tok, model_name=MODEL, port=0, max_batch=8, default_max_tokens=8).start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    yield server, client, params, cfg, tok
    server.shutdown()


def post_raw(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_greedy_completion(served):
    server, client, *_ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    a = client.completions.create(model=MODEL, prompt="The old man", max_tokens=6, temperature=0)
    b = client.completions.create(model=MODEL, prompt="The old man", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason in ("stop", "length")
    assert a.usage.prompt_tokens > 1 and a.usage.completion_tokens <= 6


def test_completion_logprobs_and_echo_match_the_model(served):
    server, client, params, cfg, tok = served
    prompt = "It was a fine morning"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    ids = tok.encode(prompt)
    gen = len(c.logprobs.tokens) - len(ids)
    assert gen == r.usage.completion_tokens and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    # Reference: a full forward pass over bos + prompt (+ what was generated).
    full = [tok.bos_id] + ids
    lp = jax.nn.log_softmax(forward(params, jnp.asarray([full], jnp.int32), cfg)[0], axis=-1)
    expected = np.asarray(lp)[np.arange(len(ids)), ids]
    np.testing.assert_allclose(c.logprobs.token_logprobs[:len(ids)], expected, atol=1e-4)
    # lm-evaluation-harness style: token-id prompt, echo, max_tokens 0 -> pure scoring, first logprob null.
    r = client.completions.create(model=MODEL, prompt=[full], max_tokens=0, logprobs=1, echo=True, temperature=0)
    lps = r.choices[0].logprobs.token_logprobs
    assert lps[0] is None and r.usage.completion_tokens == 0
    np.testing.assert_allclose(lps[1:], expected, atol=1e-4)


def test_chat_with_logprobs_and_seeded_sampling(served):
    server, client, *_ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(x.top_logprobs) == 3 and x.logprob <= 0 for x in c.logprobs.content)
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=1.0, seed=5, n=2)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=1.0, seed=5, n=2)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert len(a.choices) == 2


def test_streaming_equals_non_streaming(served):
    server, client, *_ = served
    kw = dict(model=MODEL, max_tokens=8, temperature=0)
    whole = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    parts = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts) == whole and parts[-1].choices[0].finish_reason
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_batched(served):
    server, client, *_ = served
    outs, errors = {}, []

    def ask(i):
        try:
            outs[i] = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                                     messages=[{"role": "user", "content": f"Question {i}"}])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    before = server.engine.stats["batches"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 6
    assert server.engine.stats["batches"] - before < 6 and server.engine.stats["max_rows"] > 1
    # Batched answers equal the same request served alone (greedy).
    alone = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": "Question 3"}])
    assert alone.choices[0].message.content == outs[3].choices[0].message.content


def test_bad_requests_get_4xx_json_and_the_server_lives_on(served):
    server, client, *_ = served
    status, body = post_raw(server.url + "/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post_raw(server.url + "/completions", json.dumps([1, 2]).encode())
    assert status == 400
    status, body = post_raw(server.url + "/nowhere", b"{}")
    assert status == 404 and body["error"]["message"].startswith("unknown path")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 200, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=7)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL, prompt=[[5, 10**6]])
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).choices


def test_text_offset_matches_the_returned_text(served):
    """Each logged token is the text it adds, so text[text_offset[i]:text_offset[i + 1]] is token i (echoed
    prompt and completion alike); a greedy token is among its own top_logprobs (lm-evaluation-harness checks)."""
    server, client, *_ = served
    # (The requests of the tests above, with logprobs: the same compiled programs.)
    for prompt, echo, max_tokens in [("It was a fine morning", True, 3), ("Once upon a time", False, 8)]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2,
                                      echo=echo)
        c = r.choices[0]
        tokens, offsets = c.logprobs.tokens, c.logprobs.text_offset
        assert "".join(tokens) == c.text and offsets[0] == 0 and (not echo or c.text.startswith(prompt))
        for i, token in enumerate(tokens):
            end = offsets[i + 1] if i + 1 < len(tokens) else len(c.text)
            assert c.text[offsets[i]:end] == token, (i, token)
        generated = len(tokens) - r.usage.completion_tokens
        assert all(tokens[i] in c.logprobs.top_logprobs[i] for i in range(generated, len(tokens)))
    # Raw HTTP, a token-id prompt with the bos: the bos adds no text, and the offsets still line up.
    ids = [server.app.tok.bos_id] + server.app.tok.encode("The old man")
    status, body = post_raw(server.url + "/completions", json.dumps(
        {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}).encode())
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and lp["tokens"][0] == "" and "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def test_token_texts_follow_byte_fallback_and_leading_spaces(shared_data):
    """The Llama tokenizer spells rare characters as UTF-8 bytes: the pieces that only start a character add
    "" and the one that finishes it adds the character; a leading "▁" is a space except at the start."""
    from jaxllm.serve.logprobs import token_texts
    tok = Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")
    ids = tok.encode("鑫犇 ok 中国")
    assert "<0xE9>" in [tok.id_to_piece(i) for i in ids]
    texts, _ = token_texts(tok, ids)
    assert "".join(texts) == tok.decode(ids) == "鑫犇 ok 中国"
    assert texts[:4] == ["", "", "", "鑫"] and " ok" in texts
    texts, alternatives = token_texts(tok, ids, first=len(ids) - 2, alternatives=[[ids[-2]], [tok.piece_to_id("▁A")]])
    assert texts == ["中", "国"] and alternatives == [["中"], [" A"]]


def test_every_request_is_logged_in_one_line(served, caplog):
    server, client, *_ = served
    with caplog.at_level("INFO", logger="jaxllm.serve.server"):
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
        list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="Hello", max_tokens=3)
        # A stream's line is written when its handler returns, which may be just after the client saw [DONE].
        deadline = time.monotonic() + 10
        while len([rec for rec in caplog.records if rec.name == "jaxllm.serve.server"]) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "jaxllm.serve.server"]
    tokens = f"tokens={r.usage.prompt_tokens}+{r.usage.completion_tokens}"
    assert len(lines) == 3 and all(line.startswith("127.0.0.1 POST /v1/completions ") for line in lines)
    assert sum(f" 200 {tokens} " in line for line in lines) == 2 and sum(" 404 tokens=- " in line for line in lines) == 1
    assert all(line.endswith("s") and float(line.split()[-1][:-1]) >= 0 for line in lines)


def test_api_key_is_required_when_set(served):
    """--api_key: every /v1 request needs the bearer token (401 in OpenAI's shape otherwise); /health is open."""
    _, _, params, cfg, tok = served
    server = Server(params, cfg, tok, model_name=MODEL, port=0, default_max_tokens=4, api_key="s3cret").start()
    try:
        bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        # Without a key (the openai client refuses to send none: raw HTTP).
        status, body = post_raw(server.url + "/completions", json.dumps({"model": MODEL, "prompt": "hi"}).encode())
        assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
        with urllib.request.urlopen(server.url[:-len("/v1")] + "/health", timeout=30) as r:
            assert r.status == 200
        good = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0, timeout=120)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    finally:
        server.shutdown()


def test_serve_command_reads_the_api_key_from_the_environment(served, tmp_path):
    """`JAXLLM_API_KEY=... jaxllm serve`: the user's command, in its own process, requires that key."""
    import os
    import subprocess
    import sys
    from jaxllm.weights import save_params
    _, _, params, cfg, tok = served
    ckpt = save_params(str(tmp_path / "ckpt"), params, cfg, tok.path)
    env = {**os.environ, "JAXLLM_API_KEY": "from-env", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", "serve", f"--checkpoint={ckpt}", "--port=0",
                             "--model_name=m"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "(a bearer API key required)" in line, line
        url = line.split(" at ")[1].split()[0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="other", max_retries=0, timeout=60).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="from-env", max_retries=0,
                                            timeout=60).models.list().data] == ["m"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["eval", "ppl"], ["eval", "mcq"], ["eval", "judge"],
                                     ["instruct", "generate"]])
def test_every_command_has_help(command, capsys):
    from jaxllm.cli import main
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--" in out
    if command == ["serve"]:
        assert "--api_key" in out and "JAXLLM_API_KEY" in out
