"""GRPO from an SFT model: the policy's own samples scored by a reward model and/or rule functions.

Run:
  jaxllm train --config=grpo:model=tiny --config.init_from=<sft checkpoint> \
      --config.reward.model=<reward run> --config.data.train=prompts.jsonl --config.workdir=/tmp/grpo
  jaxllm train --config=grpo ... --config.reward.functions="('mypkg.rewards:exact_match',)"   # rule-based

data.train: prompt records ({"prompt": ...}, Alpaca instructions, or messages ending with a user turn; other
fields such as "answer" reach the reward functions by name). train.batch_size counts completions: batch_size /
rl.group_size prompts per step. The init_from model is the starting policy and the frozen reference (with LoRA,
its frozen base). The GRPO knobs (rl.group_size, rl.beta, rl.clip_low / clip_high, rl.aggregation,
rl.scale_rewards, sampling) keep their defaults (jaxllm/config.py RLConfig). Arguments: `model=<preset>`
(default tiny), `template=auto|<built-in>|<.jinja file>` (the SFT model's; auto reads it from init_from).
Every other field is configs/pretrain.py's.
"""
from jaxllm.configs.post_training import post_training_config


def get_config(arg: str = ""):
    c, tiny = post_training_config(arg, seq_len=(128, 1024), eval_fraction=0.05)
    c.objective = "rl"               # G samples per prompt, group-normalised advantages, clipped ratio, k3 KL
    c.optim.lr = 1e-4 if tiny else 1e-6                           # RL moves a trained model: a small peak
    c.optim.warmup_steps = 5 if tiny else 20                      # linear warmup from 0
    c.optim.weight_decay = 0.0       # the KL to the reference, not weight decay, anchors the policy
    c.optim.decay = "constant"       # the reward, not a schedule, tells when to stop
    c.train.steps = 100 if tiny else 1000                         # rollout + update rounds
    c.train.batch_size = 32 if tiny else 256                      # completions per step (rl.group_size per prompt)
    c.train.eval_every = 25 if tiny else 100                      # held-out prompts completed and scored
    return c
