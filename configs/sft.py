"""Instruction tuning (SFT) on Alpaca / BELLE / ShareGPT / OpenAI-messages records, loss on answers only.

Run:
  jaxllm train --config=configs/sft.py:model=tiny --config.init_from=<checkpoint or HF dir> \
      --config.data.train=alpaca.json --config.workdir=/tmp/sft

Fields not listed here are those of configs/pretrain.py (optimizer, mesh, train loop), documented there.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _base import pretrain_config  # noqa: E402


def get_config(arg: str = ""):
    c, args = pretrain_config(arg)
    c.objective = "sft"              # next-token loss on assistant tokens only
    c.init_from = ""                 # the pretrained model (jaxllm checkpoint or HF dir); its tokenizer comes along
    c.data.train = ()                # instruction files (JSON array or JSON Lines); layout detected per file
    c.data.eval = ()                 # held-out files; empty = hold out data.eval_fraction of the records
    c.data.eval_fraction = 0.05      # share of records held out when data.eval is empty
    c.data.format = "auto"           # "auto" | "alpaca" | "sharegpt" | "messages"
    c.data.template = args.get("template", "alpaca")  # "alpaca", "alpaca_zh" or "chat" (data/templates.py)
    c.data.overlong = "truncate_prompt"  # too long: cut the prompt from the left ("skip" drops the sample)
    c.data.pack = True               # several samples per row, never attending to each other
    c.data.on_error = "raise"        # malformed record: "raise" names file:line:field, "skip" counts it
    c.data.seq_len = 512 if args.get("model", "tiny") == "tiny" else 2048
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)
    c.optim.lr = 2e-5 if args.get("model", "tiny") != "tiny" else 1e-3   # fine-tuning: a smaller peak
    c.optim.warmup_steps = 20 if args.get("model", "tiny") == "tiny" else 100
    c.train.steps = 200 if args.get("model", "tiny") == "tiny" else 3000
    c.train.z_loss = 0.0
    return c
