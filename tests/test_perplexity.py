"""Sliding-window perplexity against the loss Hugging Face transformers computes on the same tokens."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxllm.eval import perplexity as ppl  # noqa: E402
from jaxllm.model.convert import from_hf  # noqa: E402
from jaxllm.tokenizer import Tokenizer  # noqa: E402

TEXT = ("The cat sat on the mat. It was a sunny day, and the garden smelled of cut grass. "
        "Nobody in the house said a word until the kettle sang.")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tokenizer_path):
    """A tiny random LlamaForCausalLM with the test tokenizer's vocabulary, saved and converted."""
    vocab = Tokenizer(tokenizer_path).vocab_size
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).float().eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    params, cfg = from_hf(path)
    return model, params, cfg


def hf_loss(model, ids, labels=None):
    """transformers' own mean cross-entropy (its labels are shifted inside the model; -100 = not scored)."""
    x = torch.as_tensor([ids])
    with torch.no_grad():
        return float(model(x, labels=x if labels is None else torch.as_tensor([labels])).loss)


def test_perplexity_equals_transformers_loss_in_one_window(hf_model, tokenizer_path):
    model, params, cfg = hf_model
    tok = Tokenizer(tokenizer_path)
    ids = [tok.bos_id] + tok.encode(TEXT)
    assert len(ids) <= cfg.max_seq_len
    result = ppl.text_perplexity(params, cfg, tok, TEXT)
    loss = hf_loss(model, ids)
    assert result.tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    assert result.bits_per_char == pytest.approx(loss * (len(ids) - 1) / math.log(2) / len(TEXT), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(result.bits_per_char * len(TEXT) / len(TEXT.encode()), rel=1e-9)


def test_sliding_window_equals_transformers_strided_loop(hf_model, tokenizer_path):
    """The reference is the loop of Hugging Face's perplexity guide run on the torch model, except that the
    last window starts a full window before the end (the guide's last window is shorter: less context)."""
    model, params, cfg = hf_model
    tok = Tokenizer(tokenizer_path)
    ids = [tok.bos_id] + tok.encode(TEXT * 4)
    window, stride = 32, 12
    assert len(ids) > 3 * window
    nlls, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        begin = end - window
        trg = end - prev_end
        chunk = ids[begin:end]
        labels = [-100] * (len(chunk) - trg) + chunk[len(chunk) - trg:]
        n = sum(1 for x in labels[1:] if x != -100)
        nlls += hf_loss(model, chunk, labels) * n
        scored += n
        prev_end = end
        if end == len(ids):
            break
    nll, n = ppl.token_nll(params, cfg, ids, window=window, stride=stride, batch_size=4)
    assert n == scored == len(ids) - 1
    assert nll == pytest.approx(nlls, rel=1e-4)
    # More context never hurts much on average; but the numbers must differ from disjoint chunks.
    disjoint, _ = ppl.token_nll(params, cfg, ids, window=window, stride=window - 1)
    assert disjoint != pytest.approx(nll, rel=1e-6)


def test_windows_score_every_target_once_with_most_context():
    for n, window, stride in [(100, 16, 5), (17, 16, 15), (16, 16, 3), (2, 8, 7), (50, 10, 1), (41, 8, 7)]:
        spans = ppl.sliding_windows(n, window, stride)
        targets = [t for _, end, first in spans for t in range(first, end)]
        assert targets == list(range(1, n))
        for begin, end, first in spans[1:]:
            assert first - begin >= window - stride      # context of the first target of each later window
    with pytest.raises(ValueError, match="stride"):
        ppl.sliding_windows(10, 4, 4)


def test_per_source_breakdown_pools_the_sums(hf_model, tokenizer_path, tmp_path):
    _, params, cfg = hf_model
    tok = Tokenizer(tokenizer_path)
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "Hello there."}\n\n{"text": "General Kenobi."}\n', encoding="utf-8")
    sources = {p.name: ppl.read_text(p) for p in (tmp_path / "a.txt", tmp_path / "b.jsonl")}
    assert sources["b.jsonl"] == "Hello there.\n\nGeneral Kenobi."
    report = ppl.evaluate_perplexity(params, cfg, tok, sources, window=32, stride=16)
    a, b = report["sources"]["a.txt"], report["sources"]["b.jsonl"]
    assert report["overall"]["tokens"] == a["tokens"] + b["tokens"]
    assert report["overall"]["nll"] == pytest.approx(a["nll"] + b["nll"])
    assert "overall" in ppl.format_table(report)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no field 'text'"):
        ppl.read_text(tmp_path / "bad.jsonl")
    np.testing.assert_equal(ppl.read_text(tmp_path / "a.txt", max_chars=7), TEXT[:7])


def test_eval_ppl_command_writes_its_report(hf_model, tokenizer_path, tmp_path, capsys):
    from jaxllm.weights import save_params
    from jaxllm.cli import main
    _, params, cfg = hf_model
    ckpt = save_params(str(tmp_path / "ckpt"), params, cfg, tokenizer_path)
    (tmp_path / "held.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", f"--checkpoint={ckpt}", f"--text={tmp_path / 'held.txt'}", "--window=32",
                 "--stride=16", f"--out={out}"]) == 0
    report = json.loads(out.read_text())
    expected = ppl.text_perplexity(params, cfg, Tokenizer(tokenizer_path), TEXT, window=32, stride=16)
    assert report["overall"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert "held.txt" in capsys.readouterr().out


def test_eval_ppl_refuses_an_empty_file_even_beside_real_ones(hf_model, tokenizer_path, tmp_path, capsys):
    """An empty file has no tokens: its "perplexity 1.000, 0 bits" would be a made-up score. The command
    fails naming the file, and writes no report."""
    from jaxllm.weights import save_params
    from jaxllm.cli import main
    _, params, cfg = hf_model
    ckpt = save_params(str(tmp_path / "ckpt"), params, cfg, tokenizer_path)
    (tmp_path / "held.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text('\n{"text": "  "}\n', encoding="utf-8")
    out = tmp_path / "ppl.json"
    for empty in ("empty.txt", "blank.jsonl"):
        code = main(["eval", "ppl", f"--checkpoint={ckpt}", f"--text={tmp_path / 'held.txt'}",
                     f"--text={tmp_path / empty}", f"--out={out}"])
        captured = capsys.readouterr()
        assert code == 1 and f"{tmp_path / empty}: empty" in captured.err and "nothing to score" in captured.err
        assert "1.000" not in captured.out and not out.exists()
    # The library says the same for a text given in memory, and for one token with nothing to predict.
    tok = Tokenizer(tokenizer_path)
    with pytest.raises(ValueError, match="notes: empty text"):
        ppl.evaluate_perplexity(params, cfg, tok, {"held": TEXT, "notes": " \n"})
    with pytest.raises(ValueError, match="nothing to score"):
        ppl.token_nll(params, cfg, [tok.bos_id])


def test_long_text_logs_progress(hf_model, tokenizer_path, caplog):
    import logging
    _, params, cfg = hf_model
    with caplog.at_level(logging.INFO, logger="jaxllm.eval.perplexity"):
        ppl.text_perplexity(params, cfg, Tokenizer(tokenizer_path), TEXT * 4, window=32, stride=16, name="story")
    assert any(r.getMessage().startswith("perplexity story: ") and "windows in" in r.getMessage()
               for r in caplog.records)
