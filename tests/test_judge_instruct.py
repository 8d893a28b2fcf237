"""LLM-as-judge and self-instruct, end to end against `jaxllm serve`, plus their parsers and filters.

The served judge is a real decoder with planted weights: attention and MLP outputs are zeroed, so each
next token depends on the current token only, and the embeddings and head are set so that after the chat
template's last token it writes "8,3" and then eos. Its verdict therefore always favours Assistant 1, which
makes order swapping and aggregation exactly predictable."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.data.templates import encode_prompt
from jaxllm.eval import judge
from jaxllm.eval.client import ChatClient
from jaxllm.instruct import self_instruct as si
from jaxllm.model.spec import init_params
from jaxllm.serve.server import Server
from jaxllm.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = "planted-judge"


@pytest.fixture(scope="module")
def planted_server():
    spm = SHARED_DATA / "tokenizers" / "llama" / "tokenizer.model"
    if not spm.exists():
        pytest.skip(f"{spm} is absent (developer and CI machines have it beside the checkout)")
    tok = Tokenizer(spm)
    prompt_end = encode_prompt([{"role": "user", "content": "x"}], "chat", tok)[-1]
    chain = [prompt_end] + [tok.piece_to_id(p) for p in ("8", ",", "3")] + [tok.eos_id]
    d = len(chain)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=d, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                      mlp_dim=8, max_seq_len=1024, attention_impl="xla")
    params = init_params(cfg, jax.random.key(0))
    params["layers"]["attn"]["o"] = jnp.zeros_like(params["layers"]["attn"]["o"])
    params["layers"]["mlp"]["down"] = jnp.zeros_like(params["layers"]["mlp"]["down"])
    embedding = np.zeros((cfg.vocab_size, d), np.float32)
    head = np.zeros((d, cfg.vocab_size), np.float32)
    for state, (token, nxt) in enumerate(zip(chain[:-1], chain[1:])):
        embedding[token, state] = 1.0
        head[state, nxt] = 10.0
    params["embed"]["embedding"], params["lm_head"]["kernel"] = jnp.asarray(embedding), jnp.asarray(head)
    server = Server(params, cfg, tok, model_name=MODEL, port=0).start()
    server.engine.max_wait_s = 0.2       # gather the judge's parallel calls into one batch: fewer compiles
    yield server
    server.shutdown()


# ----------------------------------------------------------------------------------------------------
# Judge.

def test_parse_scores_on_realistic_judge_outputs():
    assert judge.parse_scores("8 7\n\nAssistant 1 gave a detailed list of tips...") == (8.0, 7.0)
    assert judge.parse_scores("9, 6.5\nAssistant 2 missed the point.") == (9.0, 6.5)
    assert judge.parse_scores("  \n8/10 4/10\nBecause...") == (8.0, 4.0)
    assert judge.parse_scores("Assistant 1: 7/10\nAssistant 2: 9/10\nBoth were fine.") == (7.0, 9.0)
    assert judge.parse_scores("Both answers are helpful, but I prefer the second one.") is None
    assert judge.parse_scores("11 12\n") is None and judge.parse_scores("") is None
    assert judge.parse_scores("8") is None


def test_question_and_answer_layouts_load(shared_data):
    belle = judge.load_questions(shared_data / "eval" / "belle" / "eval_set.json")
    assert len(belle) == 1000 and belle[0]["id"] == "0" and belle[0]["reference"]
    cats = {q["category"] for q in belle}
    assert len(cats) == 10 and "closed qa" in cats                  # the no-break space is normalised
    mt = judge.load_questions(shared_data / "eval" / "fastchat" / "mt_bench" / "question.jsonl")
    assert len(mt) == 80 and mt[0]["id"] == "81" and mt[0]["category"] == "writing"
    legacy = judge.load_questions(shared_data / "eval" / "fastchat" / "legacy_vicuna_eval" / "question.jsonl")
    answers = judge.load_answers(shared_data / "eval" / "fastchat" / "legacy_vicuna_eval" / "answer"
                                 / "answer_bard.jsonl")
    assert len(legacy) == 80 and {q["id"] for q in legacy} == set(answers)


def _legacy(shared_data, n):
    root = shared_data / "eval" / "fastchat" / "legacy_vicuna_eval"
    questions = judge.load_questions(root / "question.jsonl")[:n]
    # Real answers, cut to their first 300 characters: short prompts keep the CPU test fast.
    a, b = (judge.load_answers(root / "answer" / f"answer_{m}.jsonl") for m in ("gpt35", "vicuna-13b"))
    return questions, {k: v[:300] for k, v in a.items()}, {k: v[:300] for k, v in b.items()}


def test_judge_checkpoint_in_process_uses_its_saved_template(planted_server, shared_data, tmp_path, caplog):
    """`eval judge --judge_checkpoint`: the planted judge saved with its chat template, judged without a server."""
    from jaxllm.weights import save_params
    from jaxllm.data.templates import get_template, save_template
    from jaxllm.eval.cli import main as eval_main
    engine = planted_server.engine
    ckpt = save_params(str(tmp_path / "judge"), engine.params, engine.cfg, engine.tokenizer.path)
    save_template(ckpt, get_template("chat"))
    questions, a, b = _legacy(shared_data, 2)
    files = {}
    for name, answers in (("a", a), ("b", b)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"question_id": q["id"], "text": answers[q["id"]]}) + "\n"
                                       for q in questions))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": q["id"], "category": q["category"],
                                                          "text": q["question"]}) + "\n" for q in questions))
    caplog.set_level("INFO")
    assert eval_main(["judge", "--questions", str(tmp_path / "q.jsonl"), "--answers_a", str(files["a"]),
                      "--answers_b", str(files["b"]), "--judge_checkpoint", ckpt, "--out", str(tmp_path / "out")]) == 0
    assert "judge: chat template chat (built-in), the model's own" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["judgements"] == 4 and summary["overall"]["tie"] == 2 and summary["unparseable_judgements"] == 0


def test_judge_end_to_end_swaps_orders_aggregates_and_resumes(planted_server, shared_data, tmp_path):
    questions, a, b = _legacy(shared_data, 3)
    client = ChatClient(planted_server.url, MODEL, max_retries=0)
    summary = judge.run_judge(questions, a, b, client, tmp_path, parallel=6)
    lines = [json.loads(x) for x in (tmp_path / "judgements.jsonl").read_text().splitlines()]
    assert client.calls == 6 and len(lines) == 6
    assert all(r["judgement"].strip() == "8,3" and r["scores"] == [8.0, 3.0] for r in lines)
    assert {(r["question_id"], r["order"]) for r in lines} == {(q["id"], o) for q in questions for o in ("ab", "ba")}
    # The judge always prefers Assistant 1: A wins as "ab", loses as "ba"; averaged, every pair is a tie.
    assert summary["position_flip_rate"] == 1.0 and summary["pairs_judged_in_both_orders"] == 3
    overall = summary["overall"]
    assert (overall["score_a"], overall["score_b"]) == (5.5, 5.5)
    assert (overall["tie"], overall["win"], overall["loss"]) == (3, 0, 0)
    assert summary["categories"]["generic"]["pairs"] == 3 and summary["unparseable_judgements"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] == overall
    # Resume: nothing left to do; then two lost judgements are redone, and only those.
    again = ChatClient(planted_server.url, MODEL)
    assert judge.run_judge(questions, a, b, again, tmp_path)["overall"] == overall and again.calls == 0
    (tmp_path / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:4]))
    third = ChatClient(planted_server.url, MODEL)
    assert judge.run_judge(questions, a, b, third, tmp_path)["judgements"] == 6 and third.calls == 2
    assert "flip rate 1.000" in judge.format_table(summary)


def test_unparseable_judge_output_is_counted_and_left_out(planted_server, shared_data, tmp_path):
    questions, a, b = _legacy(shared_data, 1)
    client = ChatClient(planted_server.url, MODEL)
    summary = judge.run_judge(questions, a, b, client, tmp_path, max_tokens=1)     # the judge only says "8"
    assert summary["unparseable_judgements"] == 2 and summary["pairs_without_scores"] == 1
    assert summary["overall"]["pairs"] == 0


def test_client_errors_are_not_retried_but_named(planted_server):
    client = ChatClient(planted_server.url, "no-such-model", max_retries=3)
    with pytest.raises(judge.ClientError, match="HTTP 404") as e:
        client.chat([{"role": "user", "content": "hi"}])
    assert client.calls == 1 and e.value.status == 404
    dead = ChatClient("http://127.0.0.1:9/v1", MODEL, max_retries=2, backoff_s=0.01)
    with pytest.raises(judge.ClientError, match="giving up after 3 attempts"):
        dead.chat([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------------------------------
# Self-instruct.

ALPACA_REPLY = """ Classify the sentiment of the following movie review as positive or negative.
4. Input:
The plot dragged, but the performances were outstanding and the ending moved me to tears.
4. Output:
Positive
###
5. Instruction: Describe the image below in three sentences.
5. Input:
<noinput>
5. Output:
I cannot see images.
###
6. Instruction: Give three tips for staying healthy during the winter months.
6. Input:
<noinput>
6. Output:
1. Wash your hands often. 2. Sleep eight hours. 3. Eat fresh vegetables.
###
7. Instruction: List the planets
7. Output:
Mercury, Venus
###
8. Instruction: Translate the following sentence into French and explain"""

BELLE_REPLY = """请将下面的句子翻译成英文。
4. 输入：
今天天气很好，我们去公园散步吧。
4. 输出：
The weather is nice today, let's take a walk in the park.
###
5. 指令: 根据下面的图片写一段描述。
5. 输入:
<无输入>
5. 输出:
无法完成。
###
6. 指令：请将下面的句子翻译成英文！
6. 输入：
<无输入>
6. 输出：
Please translate."""


def test_parse_realistic_teacher_replies():
    en = si.LANGUAGES["en"]
    records, drops = si.parse_response(ALPACA_REPLY, 4, en, finish_reason="length")
    assert [r["instruction"][:20] for r in records] == ["Classify the sentime", "Describe the image b",
                                                        "Give three tips for "]
    assert records[0]["input"].startswith("The plot dragged") and records[0]["output"] == "Positive"
    assert records[1]["input"] == "" and drops == {"malformed": 1, "truncated": 1}
    index = si.DuplicateIndex(en)
    reasons = [si.filter_reason(r, en, index) for r in records]
    assert reasons == [None, "banned", None]
    zh = si.LANGUAGES["zh"]
    records, drops = si.parse_response(BELLE_REPLY, 4, zh)
    assert len(records) == 3 and not drops and records[0]["instruction"] == "请将下面的句子翻译成英文。"
    index = si.DuplicateIndex(zh)
    index.add(records[0]["instruction"])
    # Character ROUGE-L of the third against the first is 1.0 (punctuation is not a character here).
    assert [si.filter_reason(r, zh, index) for r in records[1:]] == ["banned", "duplicate"]


def test_rouge_l_by_hand():
    a, b = "the cat sat on the mat".split(), "the cat on the mat".split()
    assert si.lcs_length(a, b) == 5 and si.rouge_l(a, b) == pytest.approx(10 / 11)
    zh = si.LANGUAGES["zh"]
    x, y = si.rouge_tokens("我喜欢吃苹果。", zh), si.rouge_tokens("我不喜欢吃香蕉", zh)
    assert x == list("我喜欢吃苹果") and si.rouge_l(x, y) == pytest.approx(2 * 4 / (6 + 7))
    assert si.rouge_l([], y) == 0.0


def test_prompt_files_and_seed_tasks(shared_data):
    sft = shared_data / "sft"
    en_tasks = si.load_seed_tasks(sft / "alpaca" / "seed_tasks.jsonl")
    zh_tasks = si.load_seed_tasks(sft / "belle" / "zh_seed_tasks.json")
    assert len(en_tasks) == len(zh_tasks) == 175
    zh_prompt = si.load_prompt(sft / "belle" / "prompt_cn.txt")
    assert "\\n" not in zh_prompt and zh_prompt.endswith("下面是10个任务指令的列表：") and si.is_chinese(zh_prompt)
    text = si.encode_prompt(zh_prompt, zh_tasks[:2], si.LANGUAGES["zh"])
    assert text.endswith("###\n3. 指令:") and "\n1. 输入:\n" in text
    en = si.encode_prompt(si.load_prompt(sft / "alpaca" / "prompt.txt"), en_tasks[:1], si.LANGUAGES["en"])
    first = en_tasks[0]
    assert en.endswith(f"List of 20 tasks:\n###\n1. Instruction: {first['instruction']}\n1. Input:\n<noinput>\n"
                       f"1. Output:\n{first['output']}\n###\n2. Instruction:")


class CannedTeacher:
    """A stand-in teacher for the filter/resume bookkeeping (the HTTP path is tested against jaxllm serve)."""

    def __init__(self, replies):
        self.replies, self.calls = replies, 0

    def complete(self, messages, **kw):
        reply = self.replies[self.calls % len(self.replies)]
        self.calls += 1
        return reply, "stop"


def test_generation_filters_counts_and_resume(tmp_path):
    seeds = [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well."}]
    out = tmp_path / "data.jsonl"
    teacher = CannedTeacher([ALPACA_REPLY.rsplit("###", 1)[0]])
    stats = si.generate_instructions(seeds, "Come up with tasks:", teacher, out, num=5, k=1, max_requests=2)
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    # Request 1 keeps the sentiment task; "tips" is a near-duplicate of the seed; request 2 repeats itself.
    assert [r["instruction"][:8] for r in kept] == ["Classify"] and stats["requests"] == 2
    assert stats["dropped"] == {"banned": 2, "duplicate": 3, "malformed": 2}
    assert set(kept[0]) == {"instruction", "input", "output"}
    fresh = CannedTeacher([BELLE_REPLY.replace("4. 输入", "2. 输入").replace("4. 输出", "2. 输出")])
    stats = si.generate_instructions(seeds, "Come up with tasks:", fresh, out, num=2, k=1, max_requests=4,
                                     lang="zh")
    assert stats["requests"] == 3 and stats["kept"] == 2 and fresh.calls == 1     # resumed at request 2


def test_self_instruct_end_to_end_against_server(planted_server, shared_data, tmp_path):
    sft = shared_data / "sft" / "alpaca"
    client = ChatClient(planted_server.url, MODEL)
    seeds, prompt = si.load_seed_tasks(sft / "seed_tasks.jsonl"), si.load_prompt(sft / "prompt.txt")
    stats = si.generate_instructions(seeds, prompt, client, tmp_path / "out.jsonl", num=2, k=1, max_requests=2,
                                     max_tokens=16)
    # The planted teacher answers "8,3": one malformed block per request, nothing kept, all of it counted.
    assert client.calls == 2 and stats == {"kept": 0, "requests": 2, "dropped": {"malformed": 2}, "language": "en",
                                           "out": str(tmp_path / "out.jsonl")}
