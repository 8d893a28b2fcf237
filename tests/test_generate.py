"""KV-cache generation against step-by-step full forward passes, plus sampling determinism and stops."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model import generate as gen
from jaxllm.model.spec import init_params
from jaxllm.model.transformer import forward

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    # A large init so logits are far apart: greedy argmax is then robust to float reassociation.
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, init_std=0.3, attention_impl="xla", max_seq_len=128)
    return init_params(cfg, jax.random.key(0)), cfg


def reference_greedy(params, cfg, prompt, n, width=32):
    """Greedy decoding by re-running the full forward pass (no cache) on the growing sequence. The sequence
    sits at the start of a fixed-width row (causal attention: what follows it cannot change its logits), so
    the reference compiles once instead of once per length."""
    run = jax.jit(lambda t: forward(params, t, cfg))
    seq = list(prompt)
    for _ in range(n):
        row = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
        seq.append(int(jnp.argmax(run(row)[0, len(seq) - 1])))
    return seq[len(prompt):]


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_kv_cache_greedy_equals_full_forward_for_mixed_prompt_lengths(model, position):
    params, cfg = model
    cfg = dataclasses.replace(cfg, position=position)
    prompts = prompts_of([3, 7, 20])
    out = gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=10))
    for p, c in zip(prompts, out):
        assert c.tokens == reference_greedy(params, cfg, p, 10)
        assert c.finish_reason == "length"
        # Reported logprobs are the model's own log-softmax at each step.
        logits = forward(params, jnp.asarray([p + c.tokens], jnp.int32), cfg)[0]
        lp = jax.nn.log_softmax(logits, axis=-1)[len(p) - 1:-1]
        np.testing.assert_allclose(c.logprobs, np.asarray(lp)[np.arange(10), c.tokens], atol=1e-4)


def test_decode_step_compiles_once_per_shape_not_per_token(model):
    params, cfg = model
    prompts = prompts_of([5, 9], seed=1)
    gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=3))
    before = gen.decode_compilations()
    gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=20))   # same cache bucket (64)
    assert gen.decode_compilations() == before


def test_seeded_sampling_is_deterministic_and_top_k_1_is_greedy(model):
    params, cfg = model
    prompts = prompts_of([4, 11], seed=2)
    sp = gen.SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    a = [c.tokens for c in gen.generate(params, cfg, prompts, sp)]
    b = [c.tokens for c in gen.generate(params, cfg, prompts, sp)]
    c = [c.tokens for c in gen.generate(params, cfg, prompts, dataclasses.replace(sp, seed=8))]
    assert a == b and a != c
    # A request's draws do not depend on what else shares its batch.
    alone = gen.generate(params, cfg, prompts[1:], [sp])[0].tokens
    together = gen.generate(params, cfg, prompts, [dataclasses.replace(sp, seed=3), sp])[1].tokens
    assert alone == together
    greedy = [c.tokens for c in gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=12))]
    top1 = [c.tokens for c in gen.generate(params, cfg, prompts, dataclasses.replace(sp, top_k=1))]
    tiny_p = [c.tokens for c in gen.generate(params, cfg, prompts, dataclasses.replace(sp, top_p=1e-6))]
    assert top1 == greedy and tiny_p == greedy


def test_sample_tokens_truncates_to_top_k_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    n = logits.shape[0]
    ones = jnp.ones((n,), jnp.float32)
    seeds, rows = jnp.zeros((n,), jnp.uint32), jnp.arange(n, dtype=jnp.uint32)
    tok, *_ = gen.sample_tokens(logits, seeds, rows, 0, ones, jnp.full((n,), 2, jnp.int32), ones)
    counts = np.bincount(np.asarray(tok), minlength=4) / n
    assert counts[2:].sum() == 0 and abs(counts[0] - 0.625) < 0.03          # renormalised over the top 2
    tok, *_ = gen.sample_tokens(logits, seeds, rows, 0, ones, jnp.zeros((n,), jnp.int32), 0.79 * ones)
    counts = np.bincount(np.asarray(tok), minlength=4) / n
    assert counts[2:].sum() == 0                                              # 0.5 + 0.3 >= 0.79


def test_stop_ids_and_stop_strings(model, tokenizer_path):
    from jaxllm.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path)
    params, cfg = model
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    params = init_params(cfg, jax.random.key(1))
    prompt = tok.encode("The module", add_bos=True)
    free = gen.generate(params, cfg, [prompt], gen.SamplingParams(max_new_tokens=12), tokenizer=tok)[0]
    assert free.text == tok.decode(prompt + free.tokens)[len(tok.decode(prompt)):]
    # Stop id: the third generated token ends the row and is not part of the output.
    stop_id = free.tokens[2]
    first = free.tokens.index(stop_id)
    out = gen.generate(params, cfg, [prompt], gen.SamplingParams(max_new_tokens=12, stop_ids=(stop_id,)),
                       tokenizer=tok)[0]
    assert out.tokens == free.tokens[:first] and out.finish_reason == "stop"
    # Stop string: a piece of the free text; output is cut right before it, streamed text never shows it.
    needle = free.text.strip()[2:5]
    assert needle
    streamed = []
    out = gen.generate(params, cfg, [prompt], gen.SamplingParams(max_new_tokens=12, stop_strings=(needle,)),
                       tokenizer=tok, on_token=lambda i, c: streamed.append(c.text))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.find(needle)]
    assert all(needle not in t for t in streamed)


def test_score_tokens_matches_forward(model):
    params, cfg = model
    seqs = prompts_of([6, 13], seed=4)
    scored = gen.score_tokens(params, cfg, seqs)
    for s, r in zip(seqs, scored):
        lp = jax.nn.log_softmax(forward(params, jnp.asarray([s], jnp.int32), cfg)[0], axis=-1)
        expected = np.asarray(lp)[np.arange(len(s) - 1), s[1:]]
        assert r["logprobs"][0] is None
        np.testing.assert_allclose(r["logprobs"][1:], expected, atol=1e-4)


def test_over_long_prompt_is_refused(model):
    params, cfg = model
    with pytest.raises(ValueError, match="context is 128"):
        gen.generate(params, cfg, [[1] * 128])
