"""Chat templates against transformers: every built-in's Jinja string and real Hugging Face templates render
byte for byte as `apply_chat_template`; generation prompts tokenize as transformers tokenizes them; the SFT
mask covers exactly each answer and its end marker; templates travel with runs and checkpoints."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxllm.config import Config, DataConfig  # noqa: E402
from jaxllm.data import templates  # noqa: E402
from jaxllm.data.chat_pipeline import encode_pairs, encode_sft  # noqa: E402
from jaxllm.data.templates import (BUILTINS, TemplateError, encode_chat, encode_prompt, get_template,  # noqa: E402
                                   model_template, render_text, run_template, stop_markers)
from jaxllm.tokenizer import Tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"
MINIMIND = SHARED / "minimind"
LLAMA = SHARED / "llama" / "tokenizer.model"

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
SYSTEM = [{"role": "system", "content": "You answer briefly."}] + SINGLE
MULTI = SYSTEM + [{"role": "user", "content": "  和 3+3 呢？\n"}, {"role": "assistant", "content": "是 6。 "}]
CONVERSATIONS = {"single": SINGLE, "system": SYSTEM, "multi": MULTI,
                 "multi_no_system": MULTI[1:]}

# Qwen2.5-Instruct's chat_template, verbatim (tools branch included), as a base model ships it.
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")


class HFJsonTokenizer:
    """A tokenizer.json through the `tokenizers` library with jaxllm's Tokenizer interface, the special tokens
    named by the tokenizer_config.json beside it (or given)."""

    def __init__(self, folder: Path, **special):
        self._tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        names = {k: special.get(k, config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            self._tok.token_to_id(t) if t else -1 for t in names.values())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)


@pytest.fixture(scope="module")
def llama():
    if not LLAMA.exists():
        pytest.skip(f"{LLAMA} is absent (developer and CI machines have it beside the checkout)")
    return Tokenizer(LLAMA)


@pytest.fixture(scope="module")
def minimind():
    if not MINIMIND.exists():
        pytest.skip(f"{MINIMIND} is absent (developer and CI machines have it beside the checkout)")
    return HFJsonTokenizer(MINIMIND), transformers.AutoTokenizer.from_pretrained(str(MINIMIND))


def _hf_with(tokenizer, template: str):
    """A transformers tokenizer with `tokenizer`'s special tokens and `template` (tokenize=False needs no more)."""
    specials = templates.special_token_texts(tokenizer)
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(MINIMIND / "tokenizer.json"),
                                                chat_template=template, **specials)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_renders_like_apply_chat_template(name, llama, minimind):
    hf = _hf_with(llama, BUILTINS[name])
    for key, conv in CONVERSATIONS.items():
        for prompt in (False, True):
            messages = conv[:-1] if prompt else conv
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert render_text(messages, name, llama, add_generation_prompt=prompt) == expected, (key, prompt)


def test_real_hf_templates_render_like_apply_chat_template(minimind, tmp_path):
    ours_tok, hf = minimind
    own = model_template(MINIMIND)                 # minimind's tokenizer_config.json chat_template
    assert own is not None and own.name.endswith("tokenizer_config.json")
    for template in (own, templates.from_text(QWEN25, "qwen2.5-instruct"), get_template("qwen2.5")):
        for conv in CONVERSATIONS.values():
            for prompt in (False, True):
                messages = conv[:-1] if prompt else conv
                expected = hf.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                                  add_generation_prompt=prompt)
                assert render_text(messages, template, ours_tok, add_generation_prompt=prompt) == expected
    # Qwen2.5's own template and the built-in agree wherever no tools are involved.
    for conv in CONVERSATIONS.values():
        assert render_text(conv, templates.from_text(QWEN25, "q"), ours_tok) == render_text(conv, "qwen2.5", ours_tok)


@pytest.mark.parametrize("which", ["chatml", "own"])
def test_generation_prompt_ids_equal_transformers(which, minimind):
    ours_tok, hf = minimind
    template = get_template("chatml") if which == "chatml" else model_template(MINIMIND)
    for conv in CONVERSATIONS.values():
        expected = hf.apply_chat_template(conv[:-1], chat_template=template.source, tokenize=True,
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
        assert encode_prompt(conv[:-1], template, ours_tok) == list(expected)


def _masked_runs(ids, mask, decode) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(decode(current))
            current = []
    return runs + ([decode(current)] if current else [])


def test_sft_mask_is_each_answer_and_its_end_marker(minimind):
    ours_tok, hf = minimind
    for name, strip in (("chatml", False), ("llama3", True)):
        ids, mask = encode_chat(MULTI, name, ours_tok)
        end = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
        answers = [m["content"].strip() if strip else m["content"] for m in MULTI if m["role"] == "assistant"]
        assert _masked_runs(ids, mask, ours_tok.decode) == [a + end for a in answers]
    # The whole sample is transformers' tokenization of the rendering, less the newline after the last marker.
    ids, mask = encode_chat(MULTI, "chatml", ours_tok)
    expected = list(hf.apply_chat_template(MULTI, chat_template=BUILTINS["chatml"], tokenize=True,
                                           return_dict=True)["input_ids"])
    assert ids == expected[:len(ids)] and hf.decode(expected[len(ids):]) == "\n"


def test_sentencepiece_answers_end_with_the_eos_id(llama):
    """Built-ins on a SentencePiece vocabulary (no end-marker token): each answer's tokens, then eos, are
    trained; the bos the template writes is the bos id."""
    for name in ("alpaca", "alpaca_zh", "llama2"):
        ids, mask = encode_chat(MULTI, name, llama)
        assert ids[0] == llama.bos_id and mask[0] == 0
        trained = [i for i, m in zip(ids, mask) if m]
        answers = [m["content"] for m in MULTI if m["role"] == "assistant"]
        if name == "llama2":     # ' ' + content.strip() + ' ' + eos_token
            answers = [f" {a.strip()} " for a in answers]
        assert trained == [t for a in answers for t in llama.encode(a) + [llama.eos_id]]
        assert _masked_runs(ids, mask, llama.decode) == [llama.decode(llama.encode(a)) for a in answers]


def test_preference_responses_follow_the_template(minimind):
    ours_tok, _ = minimind
    pair = {"prompt": MULTI[:-1], "chosen": "六", "rejected": "七", "margin": 0.0}
    encoded = encode_pairs([pair], ours_tok, template="chatml", seq_len=256)[0]
    for side in ("chosen", "rejected"):
        s = encoded[side]
        assert _masked_runs(s["ids"], s["train_mask"], ours_tok.decode) == [pair[side] + "<|im_end|>"]
        prompt = encode_prompt(MULTI[:-1], "chatml", ours_tok)      # what generation is given
        assert s["ids"][:len(prompt)] == prompt and not any(s["train_mask"][:len(prompt)])


def test_a_template_that_rewrites_earlier_turns_is_refused(llama):
    # Like Qwen3's: past answers lose their reasoning once a later question follows.
    rewrites = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ 'A: ' + "
                "m.content.split('</think>')[-1] + '\\n' }}{% else %}{{ m.role + ': ' + m.content + '\\n' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with pytest.raises(TemplateError, match=r"rewriter breaks the prefix property at message 1"):
        encode_chat(conv, templates.from_text(rewrites, "rewriter"), llama)
    with pytest.raises(TemplateError, match="chat template llama2: Conversation roles must alternate"):
        render_text([{"role": "assistant", "content": "x"}], "llama2", llama)
    with pytest.raises(TemplateError, match="not a built-in .* and not a .jinja file"):
        get_template("vicuna")


def test_stop_markers(llama, minimind):
    assert stop_markers("alpaca", llama) == ((llama.eos_id,), ("### Instruction:",))
    assert stop_markers("llama2", llama) == ((llama.eos_id, llama.bos_id), ())   # the next turn opens with <s>
    assert stop_markers("chatml", llama) == ((llama.eos_id,), ("<|im_end|>", "<|im_start|>user"))
    ours_tok, _ = minimind                        # eos <|im_end|> is the marker, bos <|im_start|> opens turns
    assert stop_markers("chatml", ours_tok) == ((ours_tok.eos_id, ours_tok.bos_id), ())
    qwen_base = HFJsonTokenizer(MINIMIND, bos_token=None, eos_token="<|endoftext|>")   # Qwen2.5 base's specials
    im_end = qwen_base.encode("<|im_end|>")
    assert len(im_end) == 1
    assert stop_markers("chatml", qwen_base) == ((qwen_base.eos_id, im_end[0]), ("<|im_end|>", "<|im_start|>user"))


def test_where_templates_come_from(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN25}))
    assert model_template(hf).source == QWEN25 and run_template("auto", str(hf)).source == QWEN25
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": QWEN25}]}))
    assert model_template(listed).source == QWEN25
    # chat_template.jinja wins over tokenizer_config.json; a built-in's text is named after it.
    (hf / "chat_template.jinja").write_text(BUILTINS["llama3"])
    assert model_template(hf).name == "llama3" and get_template(str(hf / "chat_template.jinja")).name == "llama3"
    assert run_template("auto", None).name == "alpaca" and run_template("auto", "scratch").name == "alpaca"
    assert run_template("alpaca_zh", str(hf)).name == "alpaca_zh"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert model_template(bare) is None and run_template("auto", str(bare)).name == "alpaca"
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    with pytest.raises(TemplateError, match="does not parse"):
        get_template(str(broken))


def test_a_run_saves_its_template_and_inference_reads_it(tmp_path, tokenizer_path, caplog):
    from jaxllm.inference import load_for_inference
    from jaxllm.run_setup import save_run_template
    torch = pytest.importorskip("torch")
    from jaxllm.weights import import_hf
    # A Hugging Face model with its own template -> convert from-hf keeps it -> SFT "auto" picks it.
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(hf, safe_serialization=True)
    shutil.copyfile(tokenizer_path, hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN25}))
    converted = import_hf(str(hf), str(tmp_path / "converted"))
    assert (Path(converted) / "chat_template.jinja").read_text() == QWEN25
    assert load_for_inference(str(hf)).template.source == QWEN25
    assert load_for_inference(converted).template.source == QWEN25
    caplog.set_level(logging.INFO)
    from jaxllm.eval.cli import generate_main
    for flag, logged in (((), f"generate: chat template {converted}/chat_template.jinja, the model's own"),
                         (("--template=none",), "generate: no chat template (--template=none)")):
        assert generate_main(["--checkpoint", converted, "--prompt", "hi", "--max_new_tokens=2", *flag]) == 0
        assert logged in caplog.text
    for spec, expected in (("auto", QWEN25), ("llama3", BUILTINS["llama3"])):
        workdir = tmp_path / f"sft-{spec}"
        workdir.mkdir()
        cfg = Config(objective="sft", init_from=converted, workdir=str(workdir),
                     data=DataConfig(train=("x.jsonl",), template=spec))
        save_run_template(cfg)
        assert (workdir / "chat_template.jinja").read_text() == expected
        assert model_template(workdir).source == expected
    assert f"chat template: {converted}/chat_template.jinja; data.template=auto" in caplog.text
    # A pretraining run of documents passes init_from's template on; from scratch it has none.
    lm = Config(objective="lm", init_from=converted, workdir=str(tmp_path / "lm"))
    (tmp_path / "lm").mkdir()
    assert save_run_template(lm).source == QWEN25
    assert save_run_template(Config(objective="lm", workdir=str(tmp_path / "lm2"))) is None


def test_encode_sft_keeps_todays_alpaca_answers(llama):
    """SFT samples of the default template: bos, the prompt, then each answer's tokens and eos as targets."""
    sample = encode_sft([SINGLE], llama, template="alpaca", seq_len=128)[0]
    assert sample.ids[0] == llama.bos_id
    assert [i for i, m in zip(sample.ids, sample.train_mask) if m] == llama.encode("It is 4.") + [llama.eos_id]
    prompt = llama.decode(sample.ids[:sample.train_mask.index(1)])
    assert prompt == f"{templates.ALPACA_SYSTEM}\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n"
