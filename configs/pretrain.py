"""Next-token pretraining of a Llama-style decoder on packed rows.

Run (tiny model on the built-in corpora, CPU, a few minutes):
  jaxllm train --config=configs/pretrain.py:model=tiny --config.workdir=/tmp/run --config.train.steps=200

Bigger models take a preset name: `:model=125m`, `:model=tinyllama-1.1b`, `:model=llama2-7b`; any field can
be overridden with `--config.<a>.<b>=<value>` (e.g. `--config.data.sources='["corpus/"]'`).
A second run with the same workdir resumes from its newest checkpoint.
"""
import ml_collections

from jaxllm.config import PRESETS, ModelConfig, to_dict


def parse_arg(arg: str) -> dict:
    """'model=tiny,steps=100' -> {'model': 'tiny', 'steps': '100'}."""
    return dict(kv.split("=", 1) for kv in arg.split(",") if kv) if arg else {}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    model = args.get("model", "tiny")
    c = ml_collections.ConfigDict()
    c.objective = "lm"               # next-token prediction on packed rows
    c.workdir = ""                   # everything the run writes; required
    c.tokenizer = ""                 # SentencePiece tokenizer.model; empty = train one on data.sources
    c.tokenizer_vocab_size = 8000    # vocabulary of that tokenizer, when one is trained
    c.init_from = ""                 # start from these params (a jaxllm checkpoint) instead of random init

    # The model: a named preset (jaxllm/config.py PRESETS); every field of ModelConfig can be overridden.
    c.model = ml_collections.ConfigDict(to_dict(ModelConfig.preset(model)))
    c.model.vocab_size = 0           # 0 = the tokenizer's vocabulary size
    if model != "tiny":
        c.model.compute_dtype = "bfloat16"   # accelerators: bf16 matmuls, fp32 parameters and optimizer
        c.model.remat = "dots"

    c.data = ml_collections.ConfigDict()
    c.data.sources = ("builtin:peoples_daily", "builtin:reviews", "builtin:pydoc")  # files, dirs, globs, builtin:NAME
    c.data.eval_sources = ()         # held-out files; empty = hold out eval_fraction of the documents
    c.data.eval_fraction = 0.01      # share of documents held out when eval_sources is empty
    c.data.seq_len = 256 if model == "tiny" else 2048   # tokens per packed row
    c.data.jsonl_field = "text"      # text field of .jsonl files
    c.data.text_split = "line"       # .txt documents: "line", "paragraph" or "file"
    c.data.add_bos = True            # <s> before every document
    c.data.add_eos = True            # </s> after every document, so the model learns where text ends
    c.data.weights = ()              # share of tokens per source, parallel to sources; () = natural proportion
    c.data.exhaustion = ()           # per source "repeat" (reshuffled epochs) or "stop"; () = all repeat
    c.data.mix = "documents"         # mix "documents" before packing, or pack per source and mix "rows"
    c.data.weight_schedule = ()      # ((step, (w, ...)), ...): weights from that step on
    c.data.max_doc_chars = 0         # skip (and count) longer documents; 0 = no limit
    c.data.workers = 0               # Grain worker processes building rows (must divide the per-process batch)
    c.data.train = ()                # post-training record files (configs/sft.py, reward.py, dpo.py)
    c.data.eval = ()                 # held-out record files (post-training)
    c.data.format = "auto"           # record layout (post-training): auto, alpaca, sharegpt, messages
    c.data.template = "alpaca"       # prompt template (post-training): alpaca, alpaca_zh, chat
    c.data.overlong = "skip"         # a record longer than seq_len (post-training): skip or truncate_prompt
    c.data.pack = True               # SFT: several samples per row
    c.data.on_error = "raise"        # a malformed record: raise (file:line:field) or skip (counted)

    c.reward = ml_collections.ConfigDict()   # reward-model objective (configs/reward.py)
    c.reward.center = 0.0            # weight of (r_chosen + r_rejected)²
    c.reward.use_margin = True       # subtract a record's margin inside the sigmoid
    c.reward.histogram_bins = 30     # bins of the gap histograms

    c.dpo = ml_collections.ConfigDict()      # DPO objective (configs/dpo.py)
    c.dpo.beta = 0.1                 # KL anchor strength
    c.dpo.loss = "sigmoid"           # sigmoid (DPO / cDPO) or ipo
    c.dpo.label_smoothing = 0.0      # cDPO's assumed label noise
    c.dpo.reference = "cached"       # reference log-probs: cached once, or online every step

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3 if model == "tiny" else 3e-4   # peak learning rate
    c.optim.warmup_steps = 50 if model == "tiny" else 2000  # linear warmup from 0
    c.optim.decay = "cosine"         # "cosine" | "linear" | "constant" after warmup
    c.optim.decay_steps = 0          # 0 = decay until train.steps
    c.optim.min_lr_ratio = 0.1       # floor = lr * min_lr_ratio
    c.optim.b1 = 0.9                 # Adam first-moment decay
    c.optim.b2 = 0.95                # Adam second-moment decay
    c.optim.eps = 1e-8               # Adam epsilon
    c.optim.weight_decay = 0.1       # decoupled weight decay (not on norms; embeddings: next line)
    c.optim.decay_embeddings = False # also decay the embedding and the output head
    c.optim.clip_norm = 1.0          # global gradient-norm clip; 0 disables
    c.optim.grad_accum_steps = 1     # micro-batches per update (the batch is split inside the step)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                 # data-parallel size; -1 = the devices left over
    c.mesh.fsdp = 1                  # parameter/optimizer sharding size
    c.mesh.tensor = 1                # tensor-parallel size (heads, mlp, vocab)
    c.mesh.rules = (                 # logical axis -> mesh axes; model code names only the left side
        ("batch", ("data", "fsdp")), ("length", None), ("embed", "fsdp"), ("act_embed", None), ("heads", "tensor"),
        ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("vocab", "tensor"), ("layers", None))

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300 if model == "tiny" else 100_000   # optimizer updates
    c.train.batch_size = 16 if model == "tiny" else 256   # global batch, in packed rows of seq_len tokens
    c.train.seed = 0                 # parameter init and data order
    c.train.z_loss = 1e-4            # weight of log(Z)^2 (PaLM); keeps logits from drifting
    c.train.log_every = 10           # steps between log lines / metrics.jsonl rows
    c.train.eval_every = 100         # steps between held-out evaluations; 0 = only at the end
    c.train.eval_batches = 8         # held-out batches per evaluation; 0 = all of them
    c.train.eval_at_start = False    # also evaluate before the first step
    c.train.save_every = 100         # steps between checkpoints; 0 = only at the end
    c.train.keep_checkpoints = 3     # newest checkpoints kept
    c.train.async_checkpointing = True  # write checkpoints in the background
    c.train.peak_tflops = 0.0        # per-device peak for MFU; 0 = from the device kind
    return c
