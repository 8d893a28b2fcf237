"""Frozen, validated configuration dataclasses: every field, its default and what it means, in one place.

Config files (`configs/*.py`, installed as `jaxllm.configs`) start from `as_config_dict(Config(...))`, which
holds every field at its default, and state only what differs; the command line overrides any field; the
result is turned once into these dataclasses. Everything below the entry point receives them and never calls
`config.get(...)`. A bad value fails at start-up with the field's dotted name.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping

from jaxllm.configs.presets import PRESETS

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "splash")
REMAT_POLICIES = ("none", "full", "dots", "attn_out")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder. Parameter shapes are derived from these fields in `model/spec.py`."""
    vocab_size: int = 1024          # embedding and output-head rows; 0 = take the tokenizer's size at start-up
    d_model: int = 64               # residual stream width
    num_layers: int = 2             # decoder blocks
    num_heads: int = 4              # query heads
    num_kv_heads: int = 2           # = num_heads: MHA; 1: MQA; between: GQA
    head_dim: int = 16              # width of one attention head
    mlp_dim: int = 192              # SwiGLU hidden width
    max_seq_len: int = 512          # longest position the model is used at (ALiBi/RoPE need no table)
    position: str = "rope"          # "rope" or "alibi"
    rope_theta: float = 10000.0     # RoPE base wavelength
    rope_scaling: str = "none"      # "none" | "linear" (positions / factor) | "llama3" (Llama 3.1's long context)
    rope_scaling_factor: float = 1.0      # linear and llama3: how much longer than the original context
    rope_low_freq_factor: float = 1.0     # llama3: wavelengths > original_max_len / this are divided by factor
    rope_high_freq_factor: float = 4.0    # llama3: wavelengths < original_max_len / this are kept
    rope_original_max_len: int = 8192     # llama3: the context length the model was pretrained at
    qkv_bias: bool = False          # biases on the q, k, v projections (Qwen2 / Qwen2.5)
    qk_norm: bool = False           # RMSNorm over head_dim on each head of q and k, before RoPE (Qwen3)
    norm_eps: float = 1e-6          # RMSNorm epsilon
    tie_embeddings: bool = False    # share the input embedding with the output head
    init_std: float = 0.02          # standard deviation of the normal initialiser of every matrix
    param_dtype: str = "float32"    # storage and optimizer precision
    compute_dtype: str = "float32"  # matmul precision ("bfloat16" on accelerators)
    attention_impl: str = "auto"    # "auto" (per call: the fastest kernel that can run, else xla) | "xla" |
                                    # "cudnn" (GPU, bf16/fp16) | "pallas" (Triton flash, GPU) | "splash" (TPU)
    attention_block: int = 128      # tile of the pallas/splash kernels (multiple of 128); lengths are padded to it;
                                    # on a CPU, the xla attention's blocks of queries
    remat: str = "none"             # "none" | "full" | "dots" | "attn_out"
    scan_layers: bool = True        # lax.scan over stacked layers (fast compile) or a Python loop
    valid_vocab_size: int = 0       # ids >= this are padding rows (logits masked); 0 = all rows are real tokens

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}{_suggest(name, PRESETS)}; known: {sorted(PRESETS)}")
        cfg = dataclass_from_mapping(cls, {**PRESETS[name], **overrides}, "model")
        cfg.validate()
        return cfg

    def validate(self, where: str = "model") -> None:
        _check(self.num_heads % self.num_kv_heads == 0, f"{where}.num_heads ({self.num_heads}) must be "
               f"divisible by {where}.num_kv_heads ({self.num_kv_heads})")
        _check(self.position in ("rope", "alibi"), f"{where}.position must be 'rope' or 'alibi', got {self.position!r}")
        _check(self.position == "alibi" or self.head_dim % 2 == 0, f"{where}.head_dim must be even for RoPE")
        _check(self.attention_impl in ATTENTION_IMPLS,
               f"{where}.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _check(not (self.position == "alibi" and self.attention_impl in ("pallas", "splash")),
               f"{where}.attention_impl={self.attention_impl!r} takes no bias, so it cannot run ALiBi; "
               f"use 'xla', 'cudnn' or 'auto'")
        _check(self.rope_scaling in ("none", "linear", "llama3"),
               f"{where}.rope_scaling must be 'none', 'linear' or 'llama3', got {self.rope_scaling!r}")
        _check(self.rope_scaling == "none" or self.rope_scaling_factor > 0,
               f"{where}.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}")
        _check(self.rope_scaling != "llama3" or self.rope_high_freq_factor > self.rope_low_freq_factor,
               f"{where}.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
               f"{where}.rope_low_freq_factor ({self.rope_low_freq_factor})")
        _check(self.attention_block > 0 and self.attention_block % 128 == 0,
               f"{where}.attention_block must be a positive multiple of 128 (the TPU lane width), "
               f"got {self.attention_block}")
        _check(self.remat in REMAT_POLICIES, f"{where}.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("param_dtype", "compute_dtype"):
            _check(getattr(self, name) in ("float32", "bfloat16", "float16"),
                   f"{where}.{name} must be float32, bfloat16 or float16")
        for name in ("vocab_size", "valid_vocab_size"):
            _check(getattr(self, name) >= 0, f"{where}.{name} must be >= 0")
        _check(not self.vocab_size or self.valid_vocab_size <= self.vocab_size,
               f"{where}.valid_vocab_size ({self.valid_vocab_size}) exceeds {where}.vocab_size ({self.vocab_size})")
        for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len"):
            _check(getattr(self, name) > 0, f"{where}.{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they become packed rows."""
    sources: tuple[str, ...] = ()   # files, directories, globs, or builtin:NAME (see data/sources.py)
    eval_sources: tuple[str, ...] = ()  # held-out documents; empty = hold out eval_fraction of `sources`
    eval_fraction: float = 0.01     # share of documents (or records) held out when no eval files are given
    seq_len: int = 256              # tokens per packed row
    jsonl_field: str = "text"       # field holding the text in .jsonl files
    text_split: str = "file"        # documents in .txt files: "file" (the text as written, newlines and
                                    # indentation kept), "paragraph" (at blank lines) or "line" (one per line)
    piece_chars: int = 0            # documents longer than this many characters are cut into pieces (at line
                                    # ends) that are shuffled, held out and spread over rows like documents;
                                    # 0 = 4 x seq_len, < 0 = never cut (long documents are read in order)
    add_bos: bool = True            # <s> before every document
    add_eos: bool = True            # </s> after every document, so the model learns where text ends
    # Mixtures (data/mixture.py): one component per entry of `sources`.
    weights: tuple = ()             # share of training tokens per source, parallel to `sources`; () = one
                                    # stream of all sources in their natural proportion
    exhaustion: tuple = ()          # per source "repeat" (new epoch, reshuffled) or "stop"; () = all repeat
    mix: str = "documents"          # "documents": mix before packing; "rows": pack per source, mix rows
    weight_schedule: tuple = ()     # ((step, (w, ...)), ...): from `step` on, these weights replace `weights`
    max_doc_chars: int = 0          # longer documents are skipped and counted; 0 = no limit
    workers: int = 0                # Grain worker processes building training rows (must divide the per-process
                                    # batch); 0 = in this process
    # Post-training records (sft, reward, dpo): see data/formats.py for the layouts read.
    train: tuple[str, ...] = ()     # instruction or preference files (JSON array or JSON Lines)
    eval: tuple[str, ...] = ()      # held-out record files; empty = hold out eval_fraction of `train`
    format: str = "auto"            # "auto" (detected per file) | "alpaca" | "sharegpt" | "messages"
    template: str = "auto"          # chat template (data/templates.py): "auto" = init_from's own, else alpaca;
                                    # a built-in (alpaca, alpaca_zh, chat, chatml, qwen2.5, llama3, llama2), a
                                    # .jinja file, or a folder / tokenizer_config.json carrying a chat_template
    overlong: str = "skip"          # a sample longer than seq_len: "skip" or "truncate_prompt" (from the left)
    pack: bool = True               # SFT: pack several samples per row (document-masked)
    on_error: str = "raise"         # a malformed record: "raise" (file:line:field) or "skip" (counted)

    @property
    def document_piece_chars(self) -> int:
        """`piece_chars` resolved: 4 x seq_len by default (about three rows of Chinese, one of English), 0 = off."""
        return 4 * self.seq_len if self.piece_chars == 0 else max(self.piece_chars, 0)

    def validate(self, where: str = "data") -> None:
        _check(self.seq_len > 1, f"{where}.seq_len must be > 1")
        _check(self.overlong in ("skip", "truncate_prompt"), f"{where}.overlong must be 'skip' or 'truncate_prompt'")
        _check(self.on_error in ("raise", "skip"), f"{where}.on_error must be 'raise' or 'skip'")
        _check(self.format in ("auto", "alpaca", "sharegpt", "messages"),
               f"{where}.format must be auto, alpaca, sharegpt or messages, got {self.format!r}")
        _check(0.0 <= self.eval_fraction < 1.0, f"{where}.eval_fraction must be in [0, 1)")
        _check(self.text_split in ("file", "paragraph", "line"),
               f"{where}.text_split must be 'file', 'paragraph' or 'line', got {self.text_split!r}")
        _check(self.mix in ("documents", "rows"), f"{where}.mix must be 'documents' or 'rows', got {self.mix!r}")
        _check(self.max_doc_chars >= 0 and self.workers >= 0, f"{where}.max_doc_chars and {where}.workers must be >= 0")
        validate_mixture(self.sources, self.weights, self.exhaustion, self.weight_schedule, where)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, then decay to a floor."""
    lr: float = 3e-4                # peak learning rate, reached after warmup
    warmup_steps: int = 100         # linear warmup from 0
    decay: str = "cosine"           # "cosine" | "linear" | "constant" after warmup
    decay_steps: int = 0            # steps of decay after warmup; 0 = until train.steps
    min_lr_ratio: float = 0.1       # floor as a fraction of lr
    b1: float = 0.9                 # Adam first-moment decay
    b2: float = 0.95                # Adam second-moment decay
    eps: float = 1e-8               # Adam epsilon
    weight_decay: float = 0.1       # never applied to norm scales or biases
    decay_embeddings: bool = False  # apply weight decay to the embedding / output head too
    clip_norm: float = 1.0          # global gradient-norm clip; 0 disables
    grad_accum_steps: int = 1       # micro-batches per optimizer step (batch is split inside the step)
    # Adam's first moment in bfloat16 halves it (2 of the 8 bytes of moments per parameter); the second moment
    # stays float32: its (1-b2)·g² increments fall below bfloat16's 8-bit mantissa and it would stop growing.
    mu_dtype: str = "float32"       # "float32" | "bfloat16"
    trainable: str = "all"          # "all" | "new_rows": only embedding/head rows >= new_rows_from (rest frozen)
    new_rows_from: int = 0          # first trainable row for "new_rows"; 0 = the init_from checkpoint's vocab size

    def validate(self, where: str = "optim") -> None:
        _check(self.decay in ("cosine", "linear", "constant"), f"{where}.decay must be cosine, linear or constant")
        _check(self.lr > 0, f"{where}.lr must be > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{where}.min_lr_ratio must be in [0, 1]")
        _check(self.warmup_steps >= 0 and self.decay_steps >= 0, f"{where}.warmup_steps/decay_steps must be >= 0")
        _check(self.grad_accum_steps >= 1, f"{where}.grad_accum_steps must be >= 1")
        _check(self.trainable in ("all", "new_rows"), f"{where}.trainable must be 'all' or 'new_rows', "
               f"got {self.trainable!r}")
        _check(self.new_rows_from >= 0, f"{where}.new_rows_from must be >= 0")
        _check(self.mu_dtype in ("float32", "bfloat16"), f"{where}.mu_dtype must be float32 or bfloat16, "
               f"got {self.mu_dtype!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the rules mapping logical axis names to mesh axes."""
    data: int = -1                  # pure data parallelism; -1 = the devices left over
    fsdp: int = 1                   # parameters and optimizer state sharded, batch too
    tensor: int = 1                 # heads / mlp / vocab split across devices
    # (logical axis, mesh axis or axes or None). Model code names only the logical side.
    rules: tuple = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("act_embed", None),        # the residual stream of activations (its batch already uses fsdp)
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
    )

    def validate(self, where: str = "mesh") -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s > 0 for s in sizes), f"{where}: sizes must be positive or -1")
        _check(sum(s == -1 for s in sizes) <= 1, f"{where}: at most one of data/fsdp/tensor may be -1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how big, how often to log, evaluate and save."""
    steps: int = 1000               # optimizer updates
    batch_size: int = 8             # global batch in packed rows (split across processes and devices)
    seed: int = 0                   # parameter init and data order
    z_loss: float = 0.0             # weight of log(Z)^2 (PaLM), keeps the softmax normaliser near 1
    # Label smoothing ε (T5X, HF Trainer): train towards (1-ε)·one-hot + ε·prior. The prior is "uniform" over the
    # vocabulary or "unigram": the target frequencies of the batch itself (of each micro-batch with grad_accum).
    # Only what is differentiated changes; the logged and evaluated loss stays the plain cross-entropy.
    label_smoothing: float = 0.0
    smoothing_prior: str = "uniform"
    log_every: int = 10             # steps between log lines / metrics.jsonl rows
    eval_every: int = 100           # steps between held-out evaluations; 0 = only at the end
    eval_batches: int = 8           # held-out batches per evaluation; 0 = all of them
    eval_at_start: bool = False     # also evaluate before the first step (reward: the gap starts near 0)
    save_every: int = 100           # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3       # newest checkpoints kept
    async_checkpointing: bool = True  # write checkpoints in the background while training goes on
    peak_tflops: float = 0.0        # per-device peak for MFU; 0 = guess from the device kind

    def validate(self, where: str = "train") -> None:
        _check(self.steps > 0 and self.batch_size > 0, f"{where}.steps and {where}.batch_size must be > 0")
        _check(self.log_every > 0, f"{where}.log_every must be > 0")
        _check(0.0 <= self.label_smoothing < 1.0, f"{where}.label_smoothing must be in [0, 1)")
        _check(self.smoothing_prior in ("uniform", "unigram"), f"{where}.smoothing_prior must be uniform or unigram")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward model."""
    center: float = 0.0             # weight of (r_chosen + r_rejected)², keeps rewards centred on zero
    use_margin: bool = True         # subtract a record's `margin` inside the sigmoid
    histogram_bins: int = 30        # bins of the gap histograms drawn at each evaluation
    # Rewards of RL (objective "rl"): a jaxllm reward model and/or Python functions, combined with weights.
    model: str = ""                 # a reward-model checkpoint (runs/reward) scoring (prompt, completion)
    functions: tuple = ()           # "module:function" names, f(prompts, completions, completion_ids) -> floats
    judge_url: str = ""             # an OpenAI-compatible endpoint (http://host:port/v1) rating completions 0-10
    judge_model: str = "judge"      # the model name sent to it
    weights: tuple = ()             # one per source: the model, each function, the judge; empty = all 1

    def validate(self, where: str = "reward") -> None:
        _check(self.center >= 0, f"{where}.center must be >= 0")
        bad = [f for f in self.functions if not isinstance(f, str) or ":" not in f]
        _check(not bad, f"{where}.functions must be 'module:function' names, got {bad}")
        sources = int(bool(self.model)) + len(self.functions) + int(bool(self.judge_url))
        _check(not self.weights or len(self.weights) == sources, f"{where}.weights: {len(self.weights)} weights "
               f"for {sources} reward sources (reward.model, each of reward.functions, reward.judge_url)")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Objective "rl". GRPO: G samples per prompt from the current policy, rewards normalised within each
    group, a clipped policy-gradient loss and a k3 KL to the reference (the init_from model). PPO: a value head
    on the policy, per-token rewards (the score at the last token, a KL penalty at every token) and GAE."""
    algorithm: str = "grpo"         # "grpo" or "ppo"
    group_size: int = 4             # G completions per prompt; train.batch_size counts completions (rows)
    max_new_tokens: int = 64        # completion length budget; prompts are cut from the left to fit seq_len
    temperature: float = 1.0        # sampling temperature of the rollouts
    top_p: float = 1.0              # nucleus of the rollouts
    beta: float = 0.04              # weight of the k3 KL estimate to the reference, per token
    clip_low: float = 0.2           # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2          # DAPO's clip-higher: 0.28
    aggregation: str = "token"      # "token": mean over all completion tokens (DAPO); "sequence": mean per
                                    # completion, then over completions (GRPO); "dr_grpo": token sums over a
                                    # constant max_new_tokens (Dr. GRPO)
    scale_rewards: bool = True      # divide advantages by the group's std (Dr. GRPO: False)
    eval_prompts: int = 32          # held-out prompts completed and scored at each evaluation
    # Several optimisation passes over one batch of rollouts: each train step makes epochs x minibatches
    # optimizer updates (optim.warmup_steps / decay_steps count updates), the ratio measured against the
    # policy that sampled.
    epochs: int = 1                 # mu: passes over each batch of rollouts
    minibatches: int = 1            # each pass updates on this many consecutive slices of the batch
    # PPO only (algorithm="ppo"): beta is then the per-token KL penalty in the reward, not a loss term.
    gamma: float = 1.0              # discount of GAE
    lam: float = 0.95               # lambda of GAE
    value_coef: float = 0.1         # weight of the value head's loss
    value_clip: float = 0.2         # the value prediction moves at most this far from the rollout's value

    def validate(self, where: str = "rl") -> None:
        _check(self.algorithm in ("grpo", "ppo"), f"{where}.algorithm must be grpo or ppo, got {self.algorithm!r}")
        _check(self.group_size >= (2 if self.algorithm == "grpo" else 1), f"{where}.group_size must be >= 2 for "
               f"grpo (advantages compare samples of a prompt), >= 1 for ppo")
        _check(self.epochs >= 1 and self.minibatches >= 1, f"{where}.epochs and minibatches must be >= 1")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"{where}.gamma and lam must be in [0, 1]")
        _check(self.value_coef >= 0 and self.value_clip >= 0, f"{where}.value_coef and value_clip must be >= 0")
        _check(self.max_new_tokens >= 1, f"{where}.max_new_tokens must be >= 1")
        _check(self.temperature > 0, f"{where}.temperature must be > 0 (rollouts sample)")
        _check(0 < self.top_p <= 1, f"{where}.top_p must be in (0, 1]")
        _check(self.beta >= 0 and self.clip_low >= 0 and self.clip_high >= 0,
               f"{where}.beta, clip_low and clip_high must be >= 0")
        _check(self.aggregation in ("token", "sequence", "dr_grpo"),
               f"{where}.aggregation must be token, sequence or dr_grpo, got {self.aggregation!r}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct Preference Optimization against a frozen reference (the init_from model)."""
    beta: float = 0.1               # strength of the KL anchor to the reference
    loss: str = "sigmoid"           # "sigmoid" (DPO; with label_smoothing: cDPO) or "ipo"
    label_smoothing: float = 0.0    # assumed share of flipped labels (sigmoid loss only)
    reference: str = "cached"       # "cached": reference log-probs computed once; "online": every step

    def validate(self, where: str = "dpo") -> None:
        _check(self.beta > 0, f"{where}.beta must be > 0")
        _check(self.loss in ("sigmoid", "ipo"), f"{where}.loss must be 'sigmoid' or 'ipo'")
        _check(0 <= self.label_smoothing < 0.5, f"{where}.label_smoothing must be in [0, 0.5)")
        _check(self.reference in ("cached", "online"), f"{where}.reference must be 'cached' or 'online'")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")   # projection names of the decoder (model/spec.py)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on a frozen base (model/lora.py). rank 0 = off: every parameter trains.

    With rank > 0 only the adapters (and an objective's head, e.g. the reward model's) train and are saved; the
    base is init_from's weights, reloaded on resume, stored in base_dtype or quantized (QLoRA), never in the
    optimizer. DPO's reference is then the base without adapters (no second copy)."""
    rank: int = 0                   # r of W + (alpha / r)·A·B; 0 = full fine-tuning
    alpha: float = 16.0             # scale numerator (PEFT's lora_alpha)
    targets: tuple = LORA_TARGETS   # which projections get adapters
    base_dtype: str = "bfloat16"    # storage of the frozen base: "bfloat16" | "float32"
    quantize_base: str = "none"     # "none" | "int8" (per output channel) | "nf4" (QLoRA, blocks of 64); qwix
    # Also train the whole embedding and output head beside the adapters (PEFT's modules_to_save): the
    # Chinese-LLaMA recipe after a vocabulary expansion, whose new rows must learn.
    train_embeddings: bool = False

    def validate(self, where: str = "lora") -> None:
        _check(self.rank >= 0, f"{where}.rank must be >= 0")
        _check(self.alpha > 0, f"{where}.alpha must be > 0")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _check(bool(self.targets) and not unknown, f"{where}.targets must be a non-empty subset of "
               f"{LORA_TARGETS}, got {tuple(self.targets)}")
        _check(self.base_dtype in ("bfloat16", "float32"), f"{where}.base_dtype must be bfloat16 or float32")
        _check(self.quantize_base in ("none", "int8", "nf4"), f"{where}.quantize_base must be none, int8 or nf4, "
               f"got {self.quantize_base!r}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where metrics go besides metrics.jsonl, TensorBoard and the console (jaxllm/metrics.py)."""
    wandb: str = ""                 # Weights & Biases project; empty = off. Needs `pip install 'jaxllm[wandb]'`;
                                    # WANDB_MODE=offline keeps the run on disk (<workdir>/wandb, `wandb sync` later)
    wandb_entity: str = ""          # W&B team or user; empty = the logged-in account's default
    wandb_name: str = ""            # run name shown in W&B; empty = the workdir's name


INIT_SCRATCH = "scratch"    # init_from's value for random weights, said explicitly


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. `workdir` holds everything it writes (DESIGN.md, Workdir)."""
    model: ModelConfig = ModelConfig()      # the decoder's architecture and numerics
    data: DataConfig = DataConfig()         # documents or records, and how they become rows
    optim: OptimConfig = OptimConfig()      # optimizer and learning-rate schedule
    mesh: MeshConfig = MeshConfig()         # devices and sharding rules
    train: TrainConfig = TrainConfig()      # the loop
    reward: RewardConfig = RewardConfig()   # objective "reward" only
    dpo: DPOConfig = DPOConfig()            # objective "dpo" only
    rl: RLConfig = RLConfig()               # objective "rl" only
    lora: LoraConfig = LoraConfig()         # low-rank adapters on a frozen (optionally quantized) base
    log: LogConfig = LogConfig()            # optional metric sinks (Weights & Biases)
    objective: str = "lm"           # "lm" | "sft" | "reward" | "dpo" | "rl" (objectives/)
    workdir: str = ""               # everything the run writes; required
    tokenizer: str = ""             # path to a SentencePiece tokenizer.model; empty = train one on data.sources
    tokenizer_vocab_size: int = 8000  # vocabulary of the tokenizer trained when `tokenizer` is empty
    tokenizer_character_coverage: float = 0.99995  # its share of characters kept as pieces (the rest: bytes)
    init_from: str = ""             # checkpoint or Hugging Face dir to start from (params only); "scratch" =
                                    # random weights, which sft / reward / dpo need said explicitly
    resize_method: str = "none"     # init_from with a larger tokenizer: "none" (error) | "mean" | "mean_noise" |
                                    # "subword_mean" (model/resize.py)
    resize_pad_to_multiple: int = 128  # the resized vocabulary is padded to a multiple of this
    # A workdir's config.json describes its checkpoints. Rerunning in the same workdir with other values is
    # refused, naming each change, except those resuming allows (jaxllm/run_history.py: more train.steps, eval /
    # log / save cadence, keep_checkpoints, async_checkpointing, peak_tflops, mesh, attention_impl, remat, log.*).
    # True applies any change anyway; every change is recorded in <workdir>/config_history/.
    allow_config_change: bool = False

    def validate(self) -> "Config":
        _check(bool(self.workdir), "workdir must be set (--config.workdir=...)")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        _check(self.train.batch_size % self.optim.grad_accum_steps == 0,
               f"train.batch_size ({self.train.batch_size}) must be divisible by optim.grad_accum_steps "
               f"({self.optim.grad_accum_steps})")
        _check(self.resize_method in ("none", "mean", "mean_noise", "subword_mean"),
               f"resize_method must be none, mean, mean_noise or subword_mean, got {self.resize_method!r}")
        _check(self.resize_pad_to_multiple >= 1, "resize_pad_to_multiple must be >= 1")
        _check(0.0 < self.tokenizer_character_coverage <= 1.0, "tokenizer_character_coverage must be in (0, 1]")
        _check(self.train.label_smoothing == 0 or self.objective in ("lm", "sft"),
               f"train.label_smoothing smooths next-token targets (objectives lm and sft); objective "
               f"{self.objective!r} has none (DPO's own is dpo.label_smoothing)")
        _check(self.lora.rank == 0 or (bool(self.init_from) and self.init_from != INIT_SCRATCH),
               f"lora.rank={self.lora.rank} adapts a trained base: set --config.init_from=<checkpoint or Hugging "
               f"Face dir> (got {self.init_from!r})")
        _check(self.lora.rank == 0 or self.optim.trainable == "all",
               "lora.rank > 0 trains adapters only; optim.trainable='new_rows' is the full-model alternative")
        _check(self.objective == "lm" or bool(self.init_from),
               f"objective {self.objective!r} fine-tunes a trained model: set --config.init_from=<jaxllm workdir, "
               f"checkpoint or Hugging Face dir> (its tokenizer comes along), or --config.init_from=scratch to "
               f"train from random weights")
        # With init_from the context is the checkpoint's, grown to data.seq_len (run_setup.architecture_from_init).
        _check(bool(init_checkpoint(self)) or self.data.seq_len <= self.model.max_seq_len,
               f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}): raise "
               f"--config.model.max_seq_len with it, the longest position the model is used at")
        return self


def init_checkpoint(cfg: Config) -> str:
    """init_from as a path to load: "" when the run starts from random weights (unset, or "scratch")."""
    return "" if cfg.init_from in ("", INIT_SCRATCH) else cfg.init_from


def validate_mixture(sources, weights, exhaustion=(), schedule=(), where: str = "data") -> None:
    """Weights, exhaustion policies and the weight schedule against the sources; errors name the source."""
    def check_weights(ws, field):
        _check(len(ws) == len(sources), f"{field} has {len(ws)} entries but {where}.sources has {len(sources)} "
               f"({', '.join(map(repr, sources))}): give one weight per source")
        for src, w in zip(sources, ws):
            _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w == w,
                   f"{field}: the weight of source {src!r} must be a number, got {w!r}")
            _check(w >= 0, f"{field}: the weight of source {src!r} is negative ({w})")
        _check(any(w > 0 for w in ws), f"{field}: all weights are zero; at least one source needs a weight > 0")
    if weights:
        check_weights(weights, f"{where}.weights")
    _check(bool(weights or schedule) or not exhaustion,
           f"{where}.exhaustion applies to a mixture: set {where}.weights too")
    if exhaustion:
        _check(len(exhaustion) == len(sources), f"{where}.exhaustion has {len(exhaustion)} entries but "
               f"{where}.sources has {len(sources)}")
        for src, e in zip(sources, exhaustion):
            _check(e in ("repeat", "stop"),
                   f"{where}.exhaustion of source {src!r} must be 'repeat' or 'stop', got {e!r}")
    last = -1
    for i, entry in enumerate(schedule):
        _check(isinstance(entry, (tuple, list)) and len(entry) == 2,
               f"{where}.weight_schedule[{i}] must be (step, (weight, ...)), got {entry!r}")
        step, ws = entry
        _check(isinstance(step, int) and step > last, f"{where}.weight_schedule[{i}]: steps must be integers in "
               f"increasing order, got {step!r} after {last}")
        check_weights(tuple(ws), f"{where}.weight_schedule[{i}] (step {step})")
        last = step
    _check(bool(weights) or not schedule or schedule[0][0] == 0,
           f"{where}.weight_schedule must start at step 0 when {where}.weights is empty")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def dataclass_from_mapping(cls, values: Mapping[str, Any], where: str = ""):
    """Builds dataclass `cls` from a nested mapping, rejecting unknown fields with close-match suggestions."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config field {path!r}{_suggest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = dataclass_from_mapping(hint, value, path)
        elif hint is tuple or typing.get_origin(hint) is tuple:
            value = _to_tuple(value, hint, path)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif hint in (int, float, str, bool) and not isinstance(value, hint):
            raise ConfigError(f"config field {path!r} must be {hint.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _to_tuple(value, hint=tuple, path: str = ""):
    """A list, tuple or single string -> tuple; for `tuple[X, ...]` every item must be an X. The command line
    turns `--config.data.sources=5` into (5,): named here rather than failing later as `int has no startswith`."""
    if isinstance(value, str):   # a single source given on the command line
        value = (value,) if value else ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config field {path!r} must be a list, got {value!r}")
    value = tuple(_to_tuple(v) if isinstance(v, list) else v for v in value)
    item_type = typing.get_args(hint)[0] if typing.get_args(hint) else object
    for v in value:
        if not isinstance(v, item_type):
            quote = (f"; quote a name that looks like a number: --config.{path}=\"'{v}'\""
                    if item_type is str and isinstance(v, (int, float)) else "")
            raise ConfigError(f"config field {path!r} must be a list of {item_type.__name__}, got {v!r} "
                              f"({type(v).__name__}){quote}")
    return value


def from_config_dict(config) -> Config:
    """ConfigDict (or plain dict) -> validated, frozen Config."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return dataclass_from_mapping(Config, values).validate()


def as_config_dict(cfg: Config):
    """Config -> an ml_collections ConfigDict holding every field (the start of every config file), so any
    field can be overridden with --config.<a>.<b>=<value>."""
    import ml_collections   # only config files and the command line need it, not the library below them

    return ml_collections.ConfigDict(dataclasses.asdict(cfg))


def to_dict(cfg) -> dict:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    cfg = dataclass_from_mapping(ModelConfig, values, "model")
    cfg.validate()
    return cfg
