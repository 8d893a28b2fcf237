"""Direct Preference Optimization from an SFT model on preference pairs.

Run:
  jaxllm train --config=dpo:model=tiny --config.init_from=<sft checkpoint> \
      --config.data.train=pairs.jsonl --config.workdir=/tmp/dpo

The init_from model is both the starting policy and the frozen reference. data.train: preference files, as
for configs/reward.py; data.eval: held-out pairs, or empty to hold out data.eval_fraction of them. The DPO
knobs (dpo.beta, dpo.loss: sigmoid / cDPO with dpo.label_smoothing / ipo, dpo.reference: cached or online)
keep their defaults (jaxllm/config.py DPOConfig). Arguments: `model=<preset>` (default tiny),
`template=auto|<built-in>|<.jinja file>` (the SFT model's; auto
reads it from init_from). Every other field is configs/pretrain.py's.
"""
from jaxllm.configs.post_training import post_training_config


def get_config(arg: str = ""):
    c, tiny = post_training_config(arg, seq_len=(256, 1024), eval_fraction=0.1)
    c.objective = "dpo"              # -log σ(β · (policy − reference) log-ratio gap)
    c.optim.lr = 5e-4 if tiny else 5e-7                           # DPO moves a trained model: a small peak
    c.optim.warmup_steps = 10 if tiny else 100                    # linear warmup from 0
    c.optim.weight_decay = 0.0       # the reference, not weight decay, anchors the policy
    c.train.steps = 100 if tiny else 2000                         # optimizer updates
    c.train.batch_size = 8 if tiny else 64                        # pairs per step
    c.train.eval_every = 25 if tiny else 200                      # steps between held-out evaluations
    return c
