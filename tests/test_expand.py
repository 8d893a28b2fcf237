"""Vocabulary expansion on the real LLaMA and Chinese-LLaMA SentencePiece models, and tokenizer statistics."""
from __future__ import annotations

import json

import pytest

from jaxllm.cli import main as jaxllm_main
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.expand import ModelProto, expand_tokenizer, is_ascii_piece
from jaxllm.tokenizer.inspect import format_pieces, show_pieces, text_stats

MIXED = ["你好世界，待编码的句子。", "LLaMA 在 2016 年 10 月？No: it was released in 2023! 🦙🤖👍🏽",
         "  两个空格开头, tabs\tand\nnewlines 混合 English 和中文 ✨", "def f(x):\n    return x ** 2  # 平方"]
ENGLISH = ["The quick brown fox jumps over the lazy dog.", "In 2016, 10 of 12 tests passed (83.3%).",
           "for i in range(10):\n    print(i, i ** 2)  # squares", "Hello, World!  Two spaces;\ttab."]


@pytest.fixture(scope="module")
def real(request):
    from conftest import SHARED_DATA
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (developer and CI machines have it beside the checkout)")
    tokenizers = SHARED_DATA / "tokenizers"
    return {"llama": tokenizers / "llama" / "tokenizer.model",
            "zh": tokenizers / "chinese_llama_sp" / "chinese_sp.model",
            "hongloumeng": SHARED_DATA / "text" / "zh" / "novels" / "hongloumeng.txt",
            "botchan": SHARED_DATA / "text" / "en" / "botchan.txt"}


@pytest.fixture(scope="module")
def merged(real, tmp_path_factory):
    return expand_tokenizer(real["llama"], tmp_path_factory.mktemp("merged"), add=[real["zh"]])


def _lines(path, n, skip=0):
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return lines[skip:skip + n]


def test_merging_chinese_llama_into_llama_reproduces_its_49953_pieces_and_keeps_every_base_id(real, merged):
    assert merged.vocab_size == 49953                       # Chinese-LLaMA's merged tokenizer has 49953 pieces
    assert (merged.added, merged.already_present) == (17953, 2047)
    base, out = ModelProto(), ModelProto()
    base.ParseFromString(real["llama"].read_bytes())
    out.ParseFromString(open(merged.path, "rb").read())
    assert out.pieces[:32000] == base.pieces                # every base piece: same id, text, score and type
    assert out.normalizer_spec == base.normalizer_spec and out.trainer_spec == base.trainer_spec
    tok = Tokenizer(merged.path)
    assert [tok.piece_to_id(p.piece) for p in base.pieces[3:]] == list(range(3, 32000))
    # New pieces keep the added model's order, with merge scores below all of LLaMA's.
    zh = ModelProto()
    zh.ParseFromString(real["zh"].read_bytes())
    have = {p.piece for p in base.pieces}
    assert [p.piece for p in out.pieces[32000:]] == [p.piece for p in zh.pieces if p.piece not in have]
    scores = [p.score for p in out.pieces[32000:]]
    ranks = [p.score for p in base.pieces if p.score > -1e8]            # LLaMA's whitespace runs sit at -1e9
    assert scores == sorted(scores, reverse=True) and scores[0] < min(ranks)


def test_round_trip_and_fewer_tokens_on_chinese(real, merged):
    llama, tok = Tokenizer(real["llama"]), Tokenizer(merged.path)
    for text in MIXED:
        assert tok.decode(tok.encode(text)) == text
    assert [p["piece"] for p in show_pieces(tok, "待")] == ["▁待"] or len(tok.encode("待")) <= 2
    assert sum(p["byte"] for p in show_pieces(llama, "待")) == 3      # LLaMA: 待 is three byte tokens
    docs = _lines(real["hongloumeng"], 400)
    before, after = text_stats(llama, docs), text_stats(tok, docs)
    assert before["tokens_per_char"] > 1.4                          # the issue: about 1.6 on 红楼梦
    assert after["tokens_per_char"] < 0.95
    assert after["roundtrip_failures"] == 0 and after["unknown_tokens"] == 0


def test_transformers_encodes_the_same_ids_as_jaxllm_for_the_merged_model(real, merged):
    """AutoTokenizer reads the tokenizer.json the expansion writes (PreTrainedTokenizerFast, no SentencePiece
    protobuf parsed). transformers 5's LlamaTokenizer is not used: it re-reads any .model as its own BPE and
    differs from sentencepiece even on LLaMA's original tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(merged.path.rsplit("/", 1)[0])
    tok = Tokenizer(merged.path)
    texts = MIXED + ENGLISH + _lines(real["hongloumeng"], 60, skip=500) + _lines(real["botchan"], 60, skip=100)
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    assert hf("你好")["input_ids"][0] == tok.bos_id


def test_skip_ascii_pieces_keeps_every_ascii_encoding_identical(real, merged, tmp_path):
    skipped = expand_tokenizer(real["llama"], tmp_path, add=[real["zh"]], skip_ascii_pieces=True)
    assert skipped.ascii_skipped > 0 and skipped.vocab_size == 49953 - skipped.ascii_skipped
    llama, plain, ascii_safe = Tokenizer(real["llama"]), Tokenizer(merged.path), Tokenizer(skipped.path)
    english = ENGLISH + _lines(real["botchan"], 300, skip=50)
    assert [ascii_safe.encode(t) for t in english] == [llama.encode(t) for t in english]
    assert plain.encode("In 2016") != llama.encode("In 2016")           # a plain merge re-encodes numbers
    assert len(ascii_safe.encode("你好世界")) < len(llama.encode("你好世界"))   # Chinese still gains
    assert is_ascii_piece("▁2016") and not is_ascii_piece("▁你好")


def test_word_list_counts_what_it_skips_and_makes_each_word_one_piece(real, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("深度学习\n\n  \n深度学习\n大语言模型\nthe\n" + "长" * 17 + "\nhello world\n", encoding="utf-8")
    result = expand_tokenizer(real["llama"], tmp_path / "out", add_words_from=[words])
    assert (result.added, result.blank, result.duplicate, result.already_present, result.too_long) == (3, 2, 1, 1, 1)
    tok = Tokenizer(result.path)
    assert [p for p in (tok.id_to_piece(i) for i in tok.encode("深度学习和大语言模型")) if len(p) > 2] == \
        ["深度学习", "大语言模型"]
    assert tok.piece_to_id("hello▁world") >= 32000


def test_files_that_are_not_sentencepiece_models_are_named(real, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    junk = tmp_path / "junk.model"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="base .*notes.txt.* is not a SentencePiece model"):
        expand_tokenizer(text, tmp_path / "o1", add=[real["zh"]])
    with pytest.raises(ValueError, match="added model .*junk.model.* is not a SentencePiece model"):
        expand_tokenizer(real["llama"], tmp_path / "o2", add=[junk])
    with pytest.raises(ValueError, match="--add"):
        expand_tokenizer(real["llama"], tmp_path / "o3")


def test_stats_counts_match_a_hand_count(real):
    stats = text_stats(real["llama"], ["待", "hi 待"])
    # "待" -> ▁ <0xE5> <0xBE> <0x85>; "hi 待" -> ▁hi ▁ <0xE5> <0xBE> <0x85>
    assert (stats["characters"], stats["bytes"], stats["words"], stats["tokens"]) == (5, 9, 3, 9)
    assert stats["byte_fallback_tokens"] == 6 and stats["tokens_per_char"] == pytest.approx(9 / 5)
    assert stats["roundtrip_failures"] == 0 and stats["unknown_tokens"] == 0
    shown = format_pieces(real["llama"], "待")
    assert "<0xE5>" in shown and "byte" in shown and "= '待'" in shown


def test_cli_expand_stats_and_show(real, tmp_path, capsys):
    text = tmp_path / "zh.txt"
    text.write_text("\n".join(_lines(real["hongloumeng"], 50)), encoding="utf-8")
    assert jaxllm_main(["tokenizer", "expand", f"--base={real['llama']}", f"--add={real['zh']}",
                        f"--out={tmp_path / 'merged'}", "--skip_ascii_pieces"]) == 0
    assert "32000 base + " in capsys.readouterr().out
    assert jaxllm_main(["tokenizer", "stats", f"--tokenizer={real['llama']}", f"--tokenizer={tmp_path / 'merged'}",
                        f"--text={text}", f"--json={tmp_path / 's.json'}"]) == 0
    assert "tok/char" in capsys.readouterr().out
    rows = json.loads((tmp_path / "s.json").read_text())
    assert len(rows) == 2 and rows[1]["tokens_per_char"] < rows[0]["tokens_per_char"]
    assert jaxllm_main(["tokenizer", "show", f"--tokenizer={tmp_path / 'merged'}", "你好世界，待编码的句子"]) == 0
    out = capsys.readouterr().out
    assert "待" in out and "byte" not in out.split("\n", 1)[1]
    assert jaxllm_main(["tokenizer", "expand", f"--base={text}", f"--add={real['zh']}", f"--out={tmp_path}"]) == 1


def test_a_chinese_bpe_trained_on_novels_merged_into_llama_cuts_tokens_on_unseen_text(real, tmp_path):
    """A small slice of the README measurement (which trains 20000 pieces on all of text/zh)."""
    xiyouji = real["hongloumeng"].parent / "xiyouji.txt"
    zh = train_tokenizer(_lines(xiyouji, 3000), out_dir=tmp_path / "zh", vocab_size=6000, character_coverage=0.9995)
    result = expand_tokenizer(real["llama"], tmp_path / "merged", add=[zh.path])
    heldout = _lines(real["hongloumeng"], 300, skip=1000)                       # another novel: never trained on
    before, after = text_stats(real["llama"], heldout), text_stats(result.path, heldout)
    assert after["tokens_per_char"] < 0.8 * before["tokens_per_char"], (before, after)
