"""Multiple choice: a planted model gives exactly the expected accuracy on C-Eval val; the three CSV layouts
load; the C-Eval prompt matches the official evaluator's format byte for byte."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.eval import multiple_choice as mc
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import Tokenizer


@pytest.fixture
def llama_tok(shared_data):
    return Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")


def test_official_ceval_prompt_byte_for_byte(shared_data):
    ceval = shared_data / "eval" / "ceval"
    subject = "ideological_and_moral_cultivation"
    dev, _ = mc.read_csv(ceval / "dev" / f"{subject}_dev.csv")
    val, _ = mc.read_csv(ceval / "val" / f"{subject}_val.csv")
    name = mc.load_mapping(ceval)[subject]["name"]
    q = next(x for x in val if x.id == "5")
    prompt = mc.build_prompt(name, dev[:1], q, mc.STYLES["ceval"])
    expected = ("以下是中国关于思想道德修养与法律基础考试的单项选择题，请选出其中的正确答案。\n\n"
                "贯穿中国历史发展的一条主线是____\nA. 团结统一\nB. 爱好和平\nC. 爱国主义\nD. 自强不息\n答案：C\n\n"
                "人才素质的灵魂是____\nA. 德\nB. 智\nC. 体\nD. 美\n答案：")
    assert prompt.encode("utf-8") == expected.encode("utf-8")


def test_three_layouts_load(shared_data):
    root = shared_data / "eval"
    ceval, skipped = mc.load_split(root / "ceval", "val")
    assert len(ceval) == 52 and sum(map(len, ceval.values())) == 1346 and not skipped
    dev, _ = mc.load_split(root / "ceval", "dev")                 # has the extra explanation column
    assert sum(map(len, dev.values())) == 260
    cmmlu, _ = mc.load_split(root / "cmmlu", "dev")               # ",Question,...,Answer" header
    assert len(cmmlu) == 67 and sum(map(len, cmmlu.values())) == 335
    q = cmmlu["agronomy"][0]
    assert (q.id, q.question, q.options[2], q.answer) == ("0", "肉牛屠宰后，胴体的哪个部位肉质较好", "大腿", "C")
    mmlu, _ = mc.load_split(root / "mmlu", "val")                 # no header at all
    assert len(mmlu) == 57 and sum(map(len, mmlu.values())) == 1531
    first = mc.read_csv(root / "mmlu" / "dev" / "abstract_algebra_dev.csv")[0][0]
    assert first.question.startswith("Find all c in Z_3") and first.answer == "B"
    assert all(m["category"] for m in mc.load_mapping(root / "mmlu").values())


def test_malformed_and_unanswered_rows(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text('id,question,A,B,C,D,answer\n0,"two\nlines",a,b,c,d,\n1,q,a,b,c,d,A\n2,q,a,b,c,d,E\n',
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"x_test\.csv:5: field 'answer' is 'E'"):
        mc.read_csv(path)
    path.write_text('id,question,A,B,C,D,answer\n0,"two\nlines",a,b,c,d,\n1,q,a,b,c,d,A\n', encoding="utf-8")
    qs, skipped = mc.read_csv(path)
    assert [q.id for q in qs] == ["1"] and skipped == Counter({"no answer": 1}) and qs[0].where.endswith(":4")


def test_option_letter_ids_are_the_in_context_pieces(llama_tok):
    ids = mc.option_token_ids(llama_tok, mc.STYLES["ceval"])
    assert [llama_tok.id_to_piece(i) for i in ids] == ["A", "B", "C", "D"]          # not "▁A": after "："
    ids = mc.option_token_ids(llama_tok, mc.STYLES["mmlu"])
    assert [llama_tok.id_to_piece(i) for i in ids] == ["▁A", "▁B", "▁C", "▁D"]      # after "Answer:"


def planted_model(tok: Tokenizer, max_len: int):
    """A real decoder whose next-token logits after "：" are planted, and flat (all zero) after any other
    token: attention and MLP outputs are zeroed, so the residual stream is the last token's embedding.

    Among the in-context letters C > A > B = D, so it always answers C; the stand-alone pieces "▁A"/"▁C" and
    a non-letter token score higher still, so a wrong choice of letter ids or an argmax over the whole
    vocabulary answers something else."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                      mlp_dim=8, max_seq_len=max_len, attention_impl="xla")
    params = init_params(cfg, jax.random.key(0))
    params["layers"]["attn"]["o"] = jnp.zeros_like(params["layers"]["attn"]["o"])
    params["layers"]["mlp"]["down"] = jnp.zeros_like(params["layers"]["mlp"]["down"])
    colon = tok.encode("答案：")[-1]
    assert tok.id_to_piece(colon) == "："
    params["embed"]["embedding"] = jnp.zeros((cfg.vocab_size, 8)).at[colon, 0].set(1.0)
    planted = {"C": 5.0, "A": 4.0, "▁A": 10.0, "▁C": 9.0, "the": 50.0}
    head = np.zeros((8, cfg.vocab_size), np.float32)
    for piece, logit in planted.items():
        head[0, tok.piece_to_id(piece)] = logit
    params["lm_head"]["kernel"] = jnp.asarray(head)
    return params, cfg


def test_planted_model_gives_exactly_the_expected_accuracy_on_ceval_val(shared_data, llama_tok):
    ceval = shared_data / "eval" / "ceval"
    params, cfg = planted_model(llama_tok, max_len=256)
    report = mc.evaluate_mcq(params, cfg, llama_tok, ceval, shots=5, batch_size=32)
    val, _ = mc.load_split(ceval, "val")
    mapping = mc.load_mapping(ceval)
    # Expected: the share of questions whose answer is C, per subject, per category and overall.
    all_q = [q for qs in val.values() for q in qs]
    assert report["overall"]["total"] == 1346
    assert report["overall"]["correct"] == sum(q.answer == "C" for q in all_q)
    for subject, qs in val.items():
        assert report["subjects"][subject]["correct"] == sum(q.answer == "C" for q in qs), subject
    for category in {m["category"] for m in mapping.values()}:
        qs = [q for q in all_q if mapping[q.subject]["category"] == category]
        assert report["categories"][category]["correct"] == sum(q.answer == "C" for q in qs)
    assert {p["prediction"] for p in report["predictions"]} == {"C"}
    # 5 Chinese shots in byte-fallback pieces do not fit in 256 tokens: shots were dropped and counted.
    assert report["shots_dropped"] > 0
    assert "overall" in mc.format_table(report)


def test_shots_dropped_to_fit_and_counted(shared_data, llama_tok):
    ceval = shared_data / "eval" / "ceval"
    dev, _ = mc.read_csv(ceval / "dev" / "ideological_and_moral_cultivation_dev.csv")
    q = mc.read_csv(ceval / "val" / "ideological_and_moral_cultivation_val.csv")[0][5]
    style = mc.STYLES["ceval"]
    full = [llama_tok.bos_id] + llama_tok.encode(mc.build_prompt("x", dev[:5], q, style))
    two = [llama_tok.bos_id] + llama_tok.encode(mc.build_prompt("x", dev[:2], q, style))
    ids, kept, cut = mc.fit_prompt(llama_tok, "x", dev[:5], q, style, max_len=len(two))
    assert (ids, kept, cut) == (two, 2, False) and len(full) > len(two)
    ids, kept, cut = mc.fit_prompt(llama_tok, "x", dev[:5], q, style, max_len=20)
    assert len(ids) == 20 and kept == 0 and cut and ids[0] == llama_tok.bos_id
    assert llama_tok.decode(ids).endswith("答案：")


def test_real_tiny_model_runs_on_cmmlu_dev_without_self_shots(shared_data, llama_tok):
    """CMMLU here has only dev: it is scored with shots drawn from the other dev questions."""
    cfg = ModelConfig(vocab_size=llama_tok.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8, mlp_dim=16, max_seq_len=256, attention_impl="xla")
    params = init_params(cfg, jax.random.key(0))
    report = mc.evaluate_mcq(params, cfg, llama_tok, shared_data / "eval" / "cmmlu", shots=1,
                             subjects=["agronomy", "anatomy"])
    assert report["split"] == "dev" and report["overall"]["total"] == 10 and report["style"] == "ceval"
    assert 0.0 <= report["overall"]["accuracy"] <= 1.0 and report["questions_per_s"] > 0
    assert dataclasses.asdict(mc.read_csv(shared_data / "eval" / "cmmlu" / "dev" / "agronomy.csv")[0][0])["subject"] \
        == "agronomy"


def test_in_memory_questions_with_two_options(shared_data, llama_tok, caplog):
    """What the quickstart does: binary questions built in memory; a 2-option question ignores C and D.
    Scoring logs its progress (counts and rate)."""
    params, cfg = planted_model(llama_tok, max_len=256)     # prefers C, then A: with two options it answers A
    qs = [mc.Question("reviews", str(i), f"评论{i}：很好用", ("正面", "负面"), "AB"[i % 2], f"mem:{i}") for i in range(6)]
    with caplog.at_level("INFO", logger="jaxllm.eval.multiple_choice"):
        report = mc.evaluate_questions(params, cfg, llama_tok, {"reviews": qs}, {"reviews": qs}, shots=2)
    assert any(r.getMessage().startswith("multiple choice: 6 questions in ") for r in caplog.records)
    assert report["overall"] == {"correct": 3, "total": 6, "accuracy": 0.5}
    assert {p["prediction"] for p in report["predictions"]} == {"A"} and report["shots_dropped"] == 0
    prompt = mc.build_prompt("评论", qs[:1], qs[1], mc.STYLES["ceval"])
    assert prompt.endswith("评论1：很好用\nA. 正面\nB. 负面\n答案：") and "\nC." not in prompt


# ----------------------------------------------------------------------------------------------------
# `jaxllm eval mcq` as a user runs it: scores that must not be reported are errors, with a way out.

ZH_ROWS = [("中国的首都是哪里？", "北京", "上海", "广州", "深圳", "A"),
           ("一年有几个季节？", "两个", "三个", "四个", "五个", "C"),
           ("水的化学式是什么？", "CO2", "H2O", "O2", "NaCl", "B")]


def write_ceval_csv(path, rows, header="id,question,A,B,C,D,answer", answers=True):
    lines = [header] + [",".join([str(i), *row[:5]] + ([row[5] if answers else ""] if "answer" in header else []))
                        for i, row in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def mcq_checkpoint(tmp_path, llama_tok):
    from jaxllm.weights import save_params
    params, cfg = planted_model(llama_tok, max_len=256)             # always answers C
    return save_params(str(tmp_path / "ckpt"), params, cfg, llama_tok.path)


def run_mcq(capsys, checkpoint, data, *flags):
    from jaxllm.cli import main
    code = main(["eval", "mcq", f"--checkpoint={checkpoint}", f"--data={data}", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_k_shot_without_dev_is_an_error_and_zero_shot_says_its_language(tmp_path, mcq_checkpoint, capsys):
    """No dev/ and no subject_mapping.json: 5-shot is refused (not a 0-shot score labelled 5-shot); an explicit
    --shots=0 scores it, with the Chinese prompt although the subject names are English file names."""
    data = tmp_path / "set"
    write_ceval_csv(data / "val" / "geography_val.csv", ZH_ROWS)
    out = tmp_path / "mcq.json"
    code, _, err = run_mcq(capsys, mcq_checkpoint, data, "--shots=5", f"--out={out}")
    assert code == 1 and f"{data / 'dev'}: no dev split" in err and "--shots=0" in err and not out.exists()
    code, stdout, _ = run_mcq(capsys, mcq_checkpoint, data, "--shots=0", f"--out={out}")
    report = json.loads(out.read_text())
    assert code == 0 and report["shots"] == 0 and report["overall"] == {"correct": 1, "total": 3,
                                                                         "accuracy": pytest.approx(1 / 3)}
    assert (report["style"], report["prompt_language"], report["data_language"]) == ("ceval", "zh", "zh")
    assert "0-shot, ceval prompt (zh)" in stdout


def test_subject_missing_from_dev_is_an_error_and_a_small_pool_is_counted(tmp_path, mcq_checkpoint, capsys):
    data = tmp_path / "set"
    write_ceval_csv(data / "val" / "geography_val.csv", ZH_ROWS)
    write_ceval_csv(data / "val" / "chemistry_val.csv", ZH_ROWS)
    write_ceval_csv(data / "dev" / "geography_dev.csv", ZH_ROWS[:2])
    code, _, err = run_mcq(capsys, mcq_checkpoint, data, "--shots=5", f"--out={tmp_path / 'x.json'}")
    assert code == 1 and "no solved questions for 1 of 2 subjects (chemistry)" in err and "--shots=0" in err
    out = tmp_path / "geo.json"
    code, stdout, _ = run_mcq(capsys, mcq_checkpoint, data, "--shots=5", "--subjects=geography", f"--out={out}")
    report = json.loads(out.read_text())
    # Two dev questions for five shots: every question got fewer, and the report says so.
    assert code == 0 and report["overall"]["total"] == 3 and report["questions_with_fewer_shots"] == 3
    assert "3 questions with fewer shots" in stdout


def test_hidden_answers_are_an_error_and_predict_only_writes_the_ceval_submission(tmp_path, mcq_checkpoint, capsys):
    data = tmp_path / "set"
    write_ceval_csv(data / "dev" / "geography_dev.csv", ZH_ROWS)
    write_ceval_csv(data / "test" / "geography_test.csv", ZH_ROWS, answers=False)    # as C-Eval's test split
    write_ceval_csv(data / "test" / "physics_test.csv", ZH_ROWS[:2], answers=False)
    write_ceval_csv(data / "dev" / "physics_dev.csv", ZH_ROWS)
    report_path = tmp_path / "mcq.json"
    code, stdout, err = run_mcq(capsys, mcq_checkpoint, data, "--split=test", f"--out={report_path}")
    assert code == 1 and "none of its 5 questions has an answer" in err and "--predict_only" in err
    assert "0.00%" not in stdout and not report_path.exists()
    sub = tmp_path / "submission.json"
    code, stdout, _ = run_mcq(capsys, mcq_checkpoint, data, "--split=test", "--shots=2", "--predict_only",
                              f"--out={sub}")
    assert code == 0 and "predicted 5 questions in 2 subjects" in stdout and "not scored" in stdout
    assert json.loads(sub.read_text()) == {"geography": {"0": "C", "1": "C", "2": "C"}, "physics": {"0": "C", "1": "C"}}
    from jaxllm.cli import main
    with pytest.raises(SystemExit):           # told before loading anything: where would the predictions go?
        main(["eval", "mcq", f"--checkpoint={mcq_checkpoint}", f"--data={data}", "--predict_only"])
    assert "--predict_only needs --out" in capsys.readouterr().err


def test_csv_without_an_answer_column_names_the_columns(tmp_path, mcq_checkpoint, capsys):
    data = tmp_path / "set"
    write_ceval_csv(data / "val" / "geography_val.csv", ZH_ROWS, header="id,question,A,B,C,D")
    code, _, err = run_mcq(capsys, mcq_checkpoint, data, "--shots=0", f"--out={tmp_path / 'x.json'}")
    assert code == 1 and "geography_val.csv:1: header has columns ['id', 'question', 'A', 'B', 'C', 'D']" in err
    assert "missing ['answer']" in err and "question,A,B,C,D,answer" in err and "option text" not in err
    # The same file can be predicted (C-Eval's test split has no answers to read).
    qs, _ = mc.read_csv(data / "val" / "geography_val.csv", answers_required=False)
    assert [(q.id, q.answer) for q in qs] == [("0", ""), ("1", ""), ("2", "")]
    (data / "val" / "geography_val.csv").write_text("question,A,B,C\nq,a,b,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing \['d', 'answer'\]"):
        mc.read_csv(data / "val" / "geography_val.csv")


def test_english_style_is_chosen_by_the_questions_language(shared_data, tmp_path):
    """MMLU without its subject_mapping.json still gets the English prompt, C-Eval the Chinese one."""
    mmlu = tmp_path / "mmlu"
    (mmlu / "dev").mkdir(parents=True)
    src = shared_data / "eval" / "mmlu" / "dev" / "abstract_algebra_dev.csv"
    (mmlu / "dev" / src.name).write_bytes(src.read_bytes())       # a temporary copy, outside the repository
    qs, _ = mc.load_split(mmlu, "dev")
    assert not mc.is_chinese(q.question for q in qs["abstract_algebra"])
    ceval, _ = mc.load_split(shared_data / "eval" / "ceval", "dev", ["accountant"])
    assert mc.is_chinese(q.question for q in ceval["accountant"])
