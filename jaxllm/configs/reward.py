"""A Bradley-Terry reward model trained on preference pairs (prompt, chosen, rejected[, margin]).

Run:
  jaxllm train --config=reward:model=tiny --config.init_from=<checkpoint or HF dir> \
      --config.data.train=pairs.jsonl --config.workdir=/tmp/rm

init_from is the SFT or pretrained model; a scalar head is added on top. data.train: preference files
(prompt/chosen/rejected, LLaMA-Factory or MedicalGPT layouts); data.eval: held-out pairs, or empty to hold out
data.eval_fraction of them. Writes plots/reward_gap_hist_step*.png and plots/reward_gap_curve.png (the
chosen-minus-rejected gap on held-out pairs at every evaluation). Arguments: `model=<preset>` (default tiny),
`template=auto|<built-in>|<.jinja file>` (the SFT model's; auto
reads it from init_from). Every other field is configs/pretrain.py's.
"""
from jaxllm.configs.post_training import post_training_config


def get_config(arg: str = ""):
    c, tiny = post_training_config(arg, seq_len=(256, 1024), eval_fraction=0.1)
    c.objective = "reward"           # -log σ(r_chosen − r_rejected − margin)
    c.reward.center = 0.01           # (r_c + r_r)² weight: keeps rewards near zero on average
    c.optim.lr = 1e-3 if tiny else 1e-5                           # peak learning rate
    c.optim.warmup_steps = 10 if tiny else 50                     # linear warmup from 0
    c.train.steps = 150 if tiny else 2000                         # optimizer updates
    c.train.batch_size = 16 if tiny else 64                       # pairs per step
    c.train.eval_every = 25 if tiny else 200                      # steps between gap plots
    c.train.eval_batches = 0         # all held-out pairs, so the histograms are complete
    c.train.eval_at_start = True     # the gap distribution before training (mean near 0)
    return c
