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

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _base import pretrain_config  # noqa: E402


def get_config(arg: str = ""):
    c, args = pretrain_config(arg)   # "stage=2,model=125m"; every field not set here: configs/pretrain.py
    stage = int(args.get("stage", 1))
    if stage not in (1, 2):
        raise ValueError(f"continue_pretrain: stage must be 1 or 2, got {stage}")
    tiny = args.get("model", "tiny") == "tiny"
    c.init_from = ""                 # stage 1: a Hugging Face Llama dir or jaxllm checkpoint; stage 2: stage 1 workdir
    c.tokenizer = ""                 # the expanded tokenizer.model (stage 1); empty = init_from's own tokenizer
    c.resize_method = "mean"         # new rows: "mean" | "mean_noise" | "subword_mean" (base pieces' mean) | "none"
    c.resize_pad_to_multiple = 128   # padded vocabulary size (tensor-parallel splits, matmul tiles)
    c.data.sources = ("builtin:peoples_daily", "builtin:reviews")   # Chinese text; files, dirs, globs, builtin:NAME
    # Stage 1 trains fresh rows quickly; stage 2 moves pretrained weights, so a smaller peak and a longer warmup
    # (Chinese-LLaMA: 2e-4 then 1e-4) keep it from forgetting what it knew.
    c.optim.trainable = "new_rows" if stage == 1 else "all"   # "new_rows": embedding/head rows of new ids only
    c.optim.new_rows_from = 0        # first trainable row; 0 = the init_from checkpoint's vocabulary size
    c.optim.lr = 2e-4 if stage == 1 else 1e-4                   # peak learning rate
    c.optim.warmup_steps = 100 if stage == 1 else 1000          # linear warmup from 0
    c.train.steps = (300 if stage == 1 else 1000) if tiny else (2000 if stage == 1 else 20_000)  # updates
    c.train.seed = 0                 # data order and mean_noise's noise
    return c
