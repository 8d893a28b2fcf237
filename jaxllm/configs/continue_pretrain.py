"""Continued pretraining of an existing model with an expanded tokenizer (the Chinese-LLaMA recipe).

1) Expand the tokenizer (pieces of a Chinese model appended to the base's; base ids unchanged):
  jaxllm tokenizer expand --base=llama/tokenizer.model --add=zh_sp/tokenizer.model --out=merged/
2) Stage 1: only the new tokens' embedding rows and head columns learn, the rest is frozen (bit-identical):
  jaxllm train --config=continue_pretrain:stage=1 --config.init_from=<HF Llama dir> \
      --config.tokenizer=merged/tokenizer.model --config.workdir=runs/cpt1 --config.data.sources='["zh_corpus/"]'
3) Stage 2: everything trains, from stage 1's result, with a smaller peak learning rate and a longer warmup:
  jaxllm train --config=continue_pretrain:stage=2 --config.init_from=runs/cpt1 \
      --config.workdir=runs/cpt2 --config.data.sources='["zh_corpus/"]'
4) Export: jaxllm convert to-hf --checkpoint=runs/cpt2 --out=runs/cpt2_hf

The architecture and weights come from init_from (its config wins; `:model=...` only sets how to compute:
dtypes, remat, attention kernel). When the tokenizer has more pieces than the checkpoint has rows, the
embedding and head grow (resize_method) and the vocabulary is padded to resize_pad_to_multiple; padded ids are
masked out of the loss and sampling. Stage 1's first trainable row is optim.new_rows_from (default 0: the
checkpoint's vocabulary size). Arguments: `stage=1|2` (default 1), `model=<preset>` (default tiny),
e.g. `--config=continue_pretrain:stage=2,model=125m`. Every other field is configs/pretrain.py's.
"""
from jaxllm.configs import pretrain


def get_config(arg: str = ""):
    args = pretrain.parse_arg(arg, known=("stage", "model"))
    stage = int(args.get("stage", 1))
    if stage not in (1, 2):
        raise ValueError(f"continue_pretrain: stage must be 1 or 2, got {stage}")
    model = args.get("model", "tiny")
    tiny = model == "tiny"
    c = pretrain.config_for_model(model)
    c.resize_method = "mean"         # new rows: "mean" | "mean_noise" | "subword_mean" (base pieces' mean) | "none"
    c.data.sources = ("builtin:peoples_daily", "builtin:reviews")   # Chinese text; files, dirs, globs, builtin:NAME
    # Stage 1 trains fresh rows quickly; stage 2 moves pretrained weights, so a smaller peak and a longer warmup
    # (Chinese-LLaMA: 2e-4 then 1e-4) keep it from forgetting what it knew.
    c.optim.trainable = "new_rows" if stage == 1 else "all"   # "new_rows": embedding/head rows of new ids only
    c.optim.lr = 2e-4 if stage == 1 else 1e-4                   # peak learning rate
    c.optim.warmup_steps = 100 if stage == 1 else 1000          # linear warmup from 0
    c.train.steps = (300 if stage == 1 else 1000) if tiny else (2000 if stage == 1 else 20_000)  # updates
    return c
