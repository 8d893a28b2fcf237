"""Direct Preference Optimization from an SFT model on preference pairs.

Run:
  jaxllm train --config=configs/dpo.py:model=tiny --config.init_from=<sft checkpoint> \
      --config.data.train=pairs.jsonl --config.workdir=/tmp/dpo

The init_from model is both the starting policy and the frozen reference. Other fields: configs/pretrain.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _base import pretrain_config  # noqa: E402


def get_config(arg: str = ""):
    c, args = pretrain_config(arg)
    tiny = args.get("model", "tiny") == "tiny"
    c.objective = "dpo"
    c.init_from = ""                 # the SFT model: starting policy and frozen reference
    c.data.train = ()                # preference files, as for configs/reward.py
    c.data.eval = ()                 # held-out pairs; empty = hold out data.eval_fraction
    c.data.eval_fraction = 0.1       # share of pairs held out when data.eval is empty
    c.data.template = args.get("template", "alpaca")  # the template the SFT model was trained with
    c.data.overlong = "truncate_prompt"  # too long: cut the prompt from the left ("skip" drops the pair)
    c.data.on_error = "raise"        # malformed record: "raise" or "skip" (counted)
    c.data.seq_len = 256 if tiny else 1024
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)
    c.dpo.beta = 0.1                 # KL anchor strength
    c.dpo.loss = "sigmoid"           # "sigmoid" (DPO, cDPO with label_smoothing) or "ipo"
    c.dpo.label_smoothing = 0.0      # assumed share of flipped preference labels
    c.dpo.reference = "cached"       # reference log-probs once before training ("online": every step)
    c.optim.lr = 5e-4 if tiny else 5e-7
    c.optim.warmup_steps = 10 if tiny else 100
    c.optim.weight_decay = 0.0
    c.train.steps = 100 if tiny else 2000
    c.train.batch_size = 8 if tiny else 64   # pairs per step
    c.train.eval_every = 25 if tiny else 200
    c.train.z_loss = 0.0
    return c
