"""A Bradley-Terry reward model trained on preference pairs (prompt, chosen, rejected[, margin]).

Run:
  jaxllm train --config=configs/reward.py:model=tiny --config.init_from=<checkpoint or HF dir> \
      --config.data.train=pairs.jsonl --config.workdir=/tmp/rm

Writes plots/reward_gap_hist_step*.png and plots/reward_gap_curve.png (the chosen-minus-rejected gap on
held-out pairs at every evaluation). Other fields: configs/pretrain.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _base import pretrain_config  # noqa: E402


def get_config(arg: str = ""):
    c, args = pretrain_config(arg)
    tiny = args.get("model", "tiny") == "tiny"
    c.objective = "reward"           # -log σ(r_chosen − r_rejected − margin)
    c.init_from = ""                 # the SFT or pretrained model; a scalar head is added on top
    c.data.train = ()                # preference files: prompt/chosen/rejected, LLaMA-Factory, MedicalGPT layouts
    c.data.eval = ()                 # held-out pairs; empty = hold out data.eval_fraction of them
    c.data.eval_fraction = 0.1       # share of pairs held out when data.eval is empty
    c.data.template = args.get("template", "alpaca")  # prompt template, as in SFT
    c.data.overlong = "truncate_prompt"  # too long: cut the prompt from the left ("skip" drops the pair)
    c.data.on_error = "raise"        # malformed record: "raise" or "skip" (counted)
    c.data.seq_len = 256 if tiny else 1024
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)
    c.reward.center = 0.01           # (r_c + r_r)² weight: keeps rewards near zero on average
    c.reward.use_margin = True       # honour a record's `margin`
    c.reward.histogram_bins = 30     # bins of the gap histograms
    c.optim.lr = 1e-3 if tiny else 1e-5
    c.optim.warmup_steps = 10 if tiny else 50
    c.train.steps = 150 if tiny else 2000
    c.train.batch_size = 16 if tiny else 64   # pairs per step
    c.train.eval_every = 25 if tiny else 200
    c.train.eval_batches = 0         # all held-out pairs, so the histograms are complete
    c.train.eval_at_start = True     # the gap distribution before training (mean near 0)
    c.train.z_loss = 0.0
    return c
