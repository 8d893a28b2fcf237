"""Chat templates: one Jinja renderer, as transformers' `apply_chat_template` has it, for training rows, generation
prompts, serving, scoring and judging, so a model is always prompted the way it was trained.

Every template is a Jinja `chat_template` string in transformers' format (it reads `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`): a base model's own (tokenizer_config.json or
chat_template.jinja), or a built-in written the same way, so an export carries it and `apply_chat_template`
reproduces the training text byte for byte. Rendering follows transformers (ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, non-escaping `tojson`).

Which tokens carry loss comes from the rendered text, not from knowledge of the template: assistant turn i's
answer is what rendering messages[:i+1] adds to messages[:i] rendered with the generation prompt (its text plus
the end marker, e.g. "<|im_end|>" or the eos token, so the model learns to stop; whitespace after the marker is
the next turn's layout and is not trained). Each rendering must be a prefix of the next (the prefix property);
a template that rewrites earlier turns breaks it and is refused, naming the turn. The text is encoded in pieces
cut at those spans, and the bos/eos tokens' texts become their ids, so SentencePiece tokenizers (whose eos is
no text) and tokenizer.json ones (whose markers are added tokens) go through the same path.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from pathlib import Path
from typing import Sequence

from jaxllm import storage

TEMPLATE_FILE = "chat_template.jinja"          # beside a run's or a checkpoint's tokenizer, as transformers saves it

ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
ALPACA_ZH_SYSTEM = "下面是一条描述任务的指令。请写出恰当完成该请求的回答。"
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _lit(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _turns(name: str, system: str, system_open: str, system_close: str, user_open: str, user_close: str,
           assistant_open: str, assistant_close: str) -> str:
    """The Jinja of a plain-marker template: bos, an optional system text (a default when the conversation has
    none), user turns, assistant turns ending with the eos token (the stop a SentencePiece vocabulary has)."""
    return ("{{ bos_token }}"
            "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set loop_messages = messages[1:] %}"
            f"{{% else %}}{{% set system = {_lit(system)} %}}{{% set loop_messages = messages %}}{{% endif %}}"
            f"{{% if system %}}{{{{ {_lit(system_open)} + system + {_lit(system_close)} }}}}{{% endif %}}"
            "{% for message in loop_messages %}"
            f"{{% if message['role'] == 'user' %}}{{{{ {_lit(user_open)} + message['content'] + {_lit(user_close)} }}}}"
            f"{{% elif message['role'] == 'assistant' %}}{{{{ {_lit(assistant_open)} + message['content'] + "
            f"{_lit(assistant_close)} }}}}{{{{ eos_token }}}}"
            f"{{% else %}}{{{{ raise_exception({_lit(name + ': a message role must be user or assistant after an optional first system message, got ')} + message['role']) }}}}"
            "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {_lit(assistant_open)} }}}}{{% endif %}}")


def _chatml(default_system: str) -> str:
    """Qwen2.5's chat template without tool calls: <|im_start|>role\\n...<|im_end|>\\n, written the way Qwen
    writes it (whitespace control that trim_blocks / lstrip_blocks must handle)."""
    opening = ("{%- if messages[0]['role'] == 'system' %}\n"
               "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n")
    if default_system:
        opening += "{%- else %}\n    {{- " + _lit(f"<|im_start|>system\n{default_system}<|im_end|>\n") + " }}\n"
    return (opening + "{%- endif %}\n"
            "{%- for message in messages %}\n"
            "    {%- if message.role in ['user', 'assistant'] or (message.role == 'system' and not loop.first) %}\n"
            "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
            "    {%- elif not (message.role == 'system' and loop.first) %}\n"
            "        {{- raise_exception('chatml: unknown role ' + message.role) }}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|im_start|>assistant\\n' }}\n"
            "{%- endif %}\n")


# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, verbatim.
_LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
           "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
           "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
           "{% endif %}")

# Llama-2-7b-chat-hf's tokenizer_config.json chat_template, verbatim ([INST] <<SYS>>; no generation prompt:
# the prompt ends with " [/INST]").
_LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
           "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
           "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
           "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
           "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
           "{% endfor %}")

BUILTINS: dict[str, str] = {
    # Stanford Alpaca's prompt (the no-input form; an input is folded into the instruction, see alpaca_user).
    "alpaca": _turns("alpaca", ALPACA_SYSTEM, "", "\n\n", "### Instruction:\n", "\n\n", "### Response:\n", ""),
    # The same structure in Chinese (as used by Chinese-Alpaca / BELLE style SFT).
    "alpaca_zh": _turns("alpaca_zh", ALPACA_ZH_SYSTEM, "", "\n\n", "### 指令：\n", "\n\n", "### 回答：\n", ""),
    # A plain multi-turn template whose role markers are text any tokenizer encodes.
    "chat": _turns("chat", "", "<|system|>\n", "\n", "<|user|>\n", "\n", "<|assistant|>\n", "\n"),
    "chatml": _chatml(""),                      # Qwen's markers, no default system (Qwen2 / Qwen3 base style)
    "qwen2.5": _chatml(QWEN25_SYSTEM),          # Qwen2.5-Instruct's default system when none is given
    "llama3": _LLAMA3,
    "llama2": _LLAMA2,
}
DEFAULT = "alpaca"     # data.template="auto" for a model that carries no template of its own


class TemplateError(ValueError):
    """A template that cannot render a conversation, or breaks the prefix property; names the template."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str      # a built-in's name, or where the text came from ("<dir>/tokenizer_config.json")
    source: str    # the Jinja text (transformers' chat_template format)

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False, **special_tokens) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)` renders it;
        `special_tokens` are bos_token, eos_token, ... (see `special_token_texts`)."""
        import jinja2
        try:
            return _compile(self.source).render(messages=[dict(m) for m in messages],
                                                add_generation_prompt=add_generation_prompt, **special_tokens)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template {self.name}: {e}") from None

    def describe(self) -> str:
        return f"{self.name} (built-in)" if BUILTINS.get(self.name) == self.source else self.name


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """transformers' environment (utils/chat_template_utils._cached_compile_jinja_template), without its
    {% generation %} tracker: the answer spans come from prefix rendering instead."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse (line {e.lineno}: {e.message})") from None


# ---------------------------------------------------------------------------------------------------------
# Where templates come from.

def from_text(source: str, where: str) -> ChatTemplate:
    """A Jinja text read from `where`: named after the built-in it equals, else after `where`."""
    for name, text in BUILTINS.items():
        if text == source:
            return ChatTemplate(name, source)
    _compile(source)                                        # a syntax error names the file now, not mid-run
    return ChatTemplate(where, source)


def _from_tokenizer_config(path: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (its 'default')."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        if value is None:
            raise TemplateError(f"{path}: field 'chat_template' holds templates {sorted(named)} and no 'default'")
    if value is not None and not isinstance(value, str):
        raise TemplateError(f"{path}: field 'chat_template' must be text, got {type(value).__name__}")
    return value


def model_template(path: str | Path | None) -> ChatTemplate | None:
    """The template a model carries, or None: `chat_template.jinja` in a run workdir (or beside a step's
    checkpoints/), a converted checkpoint or a Hugging Face folder, else a Hugging Face folder's
    tokenizer_config.json `chat_template`; runs from before templates were saved: the built-in their
    post-training config names."""
    if not path:
        return None
    p = storage.as_path(path)
    if p.is_file():
        p = p.parent
    if (p / "state").exists() and p.name.isdigit():          # <workdir>/checkpoints/<step>
        p = p.parent.parent
    if (p / TEMPLATE_FILE).is_file():
        return from_text((p / TEMPLATE_FILE).read_text(encoding="utf-8"), str(p / TEMPLATE_FILE))
    if (p / "tokenizer_config.json").is_file():
        text = _from_tokenizer_config(p / "tokenizer_config.json")
        if text is not None:
            return from_text(text, str(p / "tokenizer_config.json"))
    run_config = p / "config.json"
    if run_config.is_file() and (p / "checkpoints").exists():
        saved = json.loads(run_config.read_text())
        name = saved.get("data", {}).get("template")
        if saved.get("objective") != "lm" and name in BUILTINS:
            return ChatTemplate(name, BUILTINS[name])
    return None


def get_template(spec: "str | ChatTemplate") -> ChatTemplate:
    """A built-in's name, a .jinja file, a tokenizer_config.json, or a folder carrying a template (a Hugging
    Face folder, a converted checkpoint, a run workdir)."""
    if isinstance(spec, ChatTemplate):
        return spec
    if spec in BUILTINS:
        return ChatTemplate(spec, BUILTINS[spec])
    p = storage.as_path(spec)
    if p.is_file() and p.suffix == ".jinja":
        return from_text(p.read_text(encoding="utf-8"), str(p))
    found = model_template(p) if p.exists() else None
    if found is None:
        raise TemplateError(f"template {spec!r}: not a built-in ({', '.join(BUILTINS)}) and not a .jinja file, a "
                            f"tokenizer_config.json with a chat_template, or a folder carrying one")
    return found


def run_template(spec: str, init_from: str | None) -> ChatTemplate:
    """A run's template: data.template "auto" is init_from's own template if it carries one, else DEFAULT;
    anything else is `get_template(spec)`."""
    if spec != "auto":
        return get_template(spec)
    own = model_template(init_from) if init_from and init_from != "scratch" else None
    return own or get_template(DEFAULT)


def save_template(directory: str | Path, template: ChatTemplate) -> Path:
    """Writes the template's text as `directory/chat_template.jinja` (the file name transformers reads)."""
    out = storage.as_path(directory) / TEMPLATE_FILE
    storage.write_text(out, template.source)
    return out


def chosen_template(flag: str | None, own: ChatTemplate | None, what: str,
                    fallback: str | None = None) -> ChatTemplate | None:
    """A command's template: its --template flag, else the model's own, else `fallback`; None (raw text
    prompts) for --template=none or when there is none of them. Logs which one `what` (generate, serve, ...)
    uses."""
    if flag and flag != "none":
        template, source = get_template(flag), "--template"
    elif own is not None and flag != "none":
        template, source = own, "the model's own"
    elif fallback and flag != "none":
        template, source = get_template(fallback), "the default: the model carries none"
    else:
        logging.info("%s: no chat template (%s): prompts are raw text", what,
                     "--template=none" if flag else "the model carries none; --template=<name> wraps them")
        return None
    logging.info("%s: chat template %s, %s", what, template.describe(), source)
    return template


def alpaca_user(instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """Alpaca/BELLE records: the optional input follows the instruction in the user turn."""
    if not input_text:
        return instruction
    label = "### Input:" if template == "alpaca" else "### 输入："
    return f"{instruction}\n\n{label}\n{input_text}"


# ---------------------------------------------------------------------------------------------------------
# Rendering with a tokenizer, and the answer spans.

def special_token_texts(tokenizer) -> dict[str, str]:
    """{bos_token, eos_token, unk_token, pad_token: text} of the tokens the tokenizer has: what transformers
    passes a template from its special_tokens_map."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.unk_id,
           "pad_token": tokenizer.pad_id}
    return {name: tokenizer.id_to_piece(i) for name, i in ids.items() if i is not None and i >= 0}


def render_text(messages: Sequence[dict], template: "ChatTemplate | str", tokenizer, *,
                add_generation_prompt: bool = False) -> str:
    """The text `apply_chat_template(tokenize=False)` gives for this tokenizer's special tokens."""
    return get_template(template).render(messages, add_generation_prompt=add_generation_prompt,
                                         **special_token_texts(tokenizer))


def answer_spans(messages: Sequence[dict], template: ChatTemplate, specials: dict[str, str], *,
                 add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendering, the [start, end) character span of each assistant turn's answer in it)."""
    full = template.render(messages, add_generation_prompt=add_generation_prompt, **specials)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True, **specials)
        through = template.render(messages[:i + 1], **specials)
        if not through.startswith(before) or not full.startswith(through):
            shown = before if not through.startswith(before) else through
            raise TemplateError(
                f"chat template {template.name} breaks the prefix property at message {i} (assistant): the "
                f"rendering up to it ({shown[-60:]!r}) is not the start of the "
                f"{'same turns with the answer' if shown is before else 'whole conversation'}, so the answer's "
                f"tokens cannot be told apart (templates that rewrite earlier turns, e.g. dropping past reasoning, "
                f"do this); choose another template (data.template / --template)")
        end = len(through.rstrip())            # whitespace after the end marker lays out the next turn
        spans.append((len(before), max(end, len(before))))
    return full, spans


def _special_ids(tokenizer) -> dict[str, int]:
    """bos/eos texts -> ids: a template writes them as text, the tokenizer must give the one id (a
    SentencePiece model encodes "</s>" as characters)."""
    return {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None and i >= 0}


def encode_text(text: str, tokenizer) -> list[int]:
    """Token ids of rendered text: bos/eos texts become their ids, the rest is the tokenizer's encoding."""
    specials = _special_ids(tokenizer)
    if not specials:
        return tokenizer.encode(text) if text else []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for piece in re.split(pattern, text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def encode_chat(messages: Sequence[dict], template: "ChatTemplate | str", tokenizer, *, train: str = "all",
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask: 1 on the answers' tokens). train: "all" assistant turns (SFT), "last" (a
    preference pair's response), "none" (a prompt). The text is encoded in pieces cut at the answer spans, the
    same way for training and generation; whitespace after the last answer is left out."""
    template = get_template(template)
    full, spans = answer_spans(messages, template, special_token_texts(tokenizer),
                               add_generation_prompt=add_generation_prompt)
    trained = {"all": set(range(len(spans))), "last": {len(spans) - 1}, "none": set()}[train]
    ids: list[int] = []
    mask: list[int] = []
    at = 0
    for k, (start, end) in enumerate(spans):
        for text, on in ((full[at:start], 0), (full[start:end], int(k in trained))):
            piece = encode_text(text, tokenizer)
            ids += piece
            mask += [on] * len(piece)
        at = end
    tail = full[at:] if add_generation_prompt or not spans else full[at:].rstrip()
    piece = encode_text(tail, tokenizer)
    return ids + piece, mask + [0] * len(piece)


def encode_prompt(messages: Sequence[dict], template: "ChatTemplate | str", tokenizer) -> list[int]:
    """The ids of a conversation rendered up to the assistant's turn (the generation prompt)."""
    return encode_chat(messages, template, tokenizer, train="none", add_generation_prompt=True)[0]


_PROBE_ANSWER, _PROBE_QUERY = "ANSWER-7f3a", "QUERY-7f3a"


def stop_markers(template: "ChatTemplate | str", tokenizer) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop ids, stop strings) that end an answer at generation: the eos id, the template's end marker (its
    id when it is one token, e.g. <|im_end|>) and the opening of the next user turn (a model that starts it has
    finished its answer): as text, or as the bos/eos id it starts with (llama2's <s>[INST], decoded as "")."""
    template = get_template(template)
    specials = special_token_texts(tokenizer)
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE_ANSWER},
            {"role": "user", "content": _PROBE_QUERY}]
    full, spans = answer_spans(conv, template, specials)
    start, end = spans[0]
    answer = full[start:end]
    marker = answer[answer.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):].strip()
    opener = full[end:full.index(_PROBE_QUERY)].strip()
    ids = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    for text, i in _special_ids(tokenizer).items():
        marker = marker.replace(text, "")
        if opener.startswith(text):
            ids.append(i)
            opener = ""
    marker_ids = encode_text(marker, tokenizer) if marker else []
    if len(marker_ids) == 1:
        ids.append(marker_ids[0])
    return tuple(dict.fromkeys(ids)), tuple(dict.fromkeys(s for s in (marker, opener) if s))
