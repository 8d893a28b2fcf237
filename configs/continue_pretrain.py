"""Continued pretraining of an existing model with an expanded tokenizer (the Chinese-LLaMA recipe).

1) Expand the tokenizer (pieces of a Chinese model appended to the base's; base ids unchanged):
  jaxllm tokenizer expand --base=llama/tokenizer.model --add=zh_sp/tokenizer.model --out=merged/
2) Stage 1: only the new tokens' embedding rows and head columns learn, the rest is frozen (bit-identical):
  jaxllm train --config=configs/continue_pretrain.py:stage=1 --config.init_from=<HF Llama dir> \
      --config.tokenizer=merged/tokenizer.model --config.workdir=runs/cpt1 --config.data.sources='["zh_corpus/"]'
3) Stage 2: everything trains, from stage 1's result, with a smaller peak learning rate and a longer warmup:
  jaxllm train --config=configs/continue_pretrain.py:stage=2 --config.init_from=runs/cpt1 \
      --config.workdir=runs/cpt2 --config.data.sources='["zh_corpus/"]'
4) Export: jaxllm convert to-hf --checkpoint=runs/cpt2 --out=runs/cpt2_hf

The architecture and weights come from init_from (its config wins; `:model=...` only sets how to compute:
dtypes, remat, attention kernel). When the tokenizer has more pieces than the checkpoint has rows, the
embedding and head grow (resize_method) and the vocabulary is padded to resize_pad_to_multiple; padded ids are
masked out of the loss and sampling. Arguments: `stage=1|2` (default 1), `model=<preset>` (default tiny).
"""
import ml_collections

from jaxllm.config import ModelConfig, to_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = dict(kv.split("=", 1) for kv in arg.split(",") if kv) if arg else {}   # "stage=2,model=125m"
    stage = int(args.get("stage", 1))
    if stage not in (1, 2):
        raise ValueError(f"continue_pretrain: stage must be 1 or 2, got {stage}")
    model = args.get("model", "tiny")
    c = ml_collections.ConfigDict()
    c.objective = "lm"               # next-token prediction on packed rows
    c.workdir = ""                   # everything the run writes; required
    c.init_from = ""                 # stage 1: a Hugging Face Llama dir or jaxllm checkpoint; stage 2: stage 1 workdir
    c.tokenizer = ""                 # the expanded tokenizer.model (stage 1); empty = init_from's own tokenizer
    c.tokenizer_vocab_size = 8000    # unused here (only when no tokenizer exists anywhere and one is trained)
    c.resize_method = "mean"         # new rows: "mean" | "mean_noise" | "subword_mean" (base pieces' mean) | "none"
    c.resize_pad_to_multiple = 128   # padded vocabulary size (tensor-parallel splits, matmul tiles)

    # How to compute; the shapes are init_from's (jaxllm/config.py PRESETS only fill the block here).
    c.model = ml_collections.ConfigDict(to_dict(ModelConfig.preset(model)))
    if model != "tiny":
        c.model.compute_dtype = "bfloat16"   # accelerators: bf16 matmuls, fp32 parameters and optimizer
        c.model.remat = "dots"

    c.data = ml_collections.ConfigDict()
    c.data.sources = ("builtin:peoples_daily", "builtin:reviews")   # Chinese text; files, dirs, globs, builtin:NAME
    c.data.eval_sources = ()         # held-out files; empty = hold out eval_fraction of the documents
    c.data.eval_fraction = 0.01      # share of documents held out when eval_sources is empty
    c.data.seq_len = 256 if model == "tiny" else 2048   # tokens per packed row (at most init_from's positions)
    c.data.jsonl_field = "text"      # text field of .jsonl files
    c.data.text_split = "line"       # .txt documents: "line", "paragraph" or "file"
    c.data.add_bos = True            # <s> before every document
    c.data.add_eos = True            # </s> after every document

    # Stage 1 trains fresh rows quickly; stage 2 moves pretrained weights, so a smaller peak and a longer warmup
    # (Chinese-LLaMA: 2e-4 then 1e-4) keep it from forgetting what it knew.
    c.optim = ml_collections.ConfigDict()
    c.optim.trainable = "new_rows" if stage == 1 else "all"   # "new_rows": embedding/head rows of new ids only
    c.optim.new_rows_from = 0        # first trainable row; 0 = the init_from checkpoint's vocabulary size
    c.optim.lr = 2e-4 if stage == 1 else 1e-4                   # peak learning rate
    c.optim.warmup_steps = 100 if stage == 1 else 1000          # linear warmup from 0
    c.optim.decay = "cosine"         # "cosine" | "linear" | "constant" after warmup
    c.optim.decay_steps = 0          # 0 = decay until train.steps
    c.optim.min_lr_ratio = 0.1       # floor = lr * min_lr_ratio
    c.optim.b1 = 0.9                 # Adam first-moment decay
    c.optim.b2 = 0.95                # Adam second-moment decay
    c.optim.eps = 1e-8               # Adam epsilon
    c.optim.weight_decay = 0.1       # decoupled weight decay (not on norms; embeddings: next line)
    c.optim.decay_embeddings = False # also decay the embedding and the output head
    c.optim.clip_norm = 1.0          # global gradient-norm clip (stage 1: over the new rows only); 0 disables
    c.optim.grad_accum_steps = 1     # micro-batches per update (the batch is split inside the step)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                 # data-parallel size; -1 = the devices left over
    c.mesh.fsdp = 1                  # parameter/optimizer sharding size
    c.mesh.tensor = 1                # tensor-parallel size (heads, mlp, vocab)
    c.mesh.rules = (                 # logical axis -> mesh axes; model code names only the left side
        ("batch", ("data", "fsdp")), ("length", None), ("embed", "fsdp"), ("act_embed", None), ("heads", "tensor"),
        ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("vocab", "tensor"), ("layers", None))

    c.train = ml_collections.ConfigDict()
    c.train.steps = (300 if stage == 1 else 1000) if model == "tiny" else (2000 if stage == 1 else 20_000)  # updates
    c.train.batch_size = 16 if model == "tiny" else 256   # global batch, in packed rows of seq_len tokens
    c.train.seed = 0                 # data order and mean_noise's noise
    c.train.z_loss = 1e-4            # weight of log(Z)^2 (PaLM); keeps logits from drifting
    c.train.log_every = 10           # steps between log lines / metrics.jsonl rows
    c.train.eval_every = 100         # steps between held-out evaluations; 0 = only at the end
    c.train.eval_batches = 8         # held-out batches per evaluation; 0 = all of them
    c.train.save_every = 100         # steps between checkpoints; 0 = only at the end
    c.train.keep_checkpoints = 3     # newest checkpoints kept
    c.train.async_checkpointing = True  # write checkpoints in the background
    c.train.peak_tflops = 0.0        # per-device peak for MFU; 0 = from the device kind
    return c
