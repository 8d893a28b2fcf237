"""PPO from an SFT model: the policy's own samples scored by a reward model and/or rule functions, a value head
on the policy and GAE.

Run:
  jaxllm train --config=ppo:model=tiny --config.init_from=<sft checkpoint> \
      --config.reward.model=<reward run> --config.data.train=prompts.jsonl --config.workdir=/tmp/ppo

Each step samples rl.group_size completions of each prompt (train.batch_size counts completions), scores them,
and gives each completion token the reward -rl.beta·(log policy - log reference) (the KL penalty, in the reward
as RLHF's PPO has it), the score on the last token; GAE (rl.gamma, rl.lam) over a fresh value head's
predictions gives the advantages, whitened over the batch. Then rl.epochs passes over the rollouts in
rl.minibatches slices of the clipped policy loss plus rl.value_coef x the clipped value loss
(optim.warmup_steps counts these updates). The init_from model is the starting policy and the frozen reference
(with LoRA, its frozen base). Arguments: `model=<preset>` (default tiny), `template=auto|<built-in>|<.jinja>`.
Every other field is configs/grpo.py's.
"""
from jaxllm.configs import grpo


def get_config(arg: str = ""):
    c = grpo.get_config(arg)
    c.rl.algorithm = "ppo"           # value head + GAE instead of group-normalised rewards
    c.rl.group_size = 1              # no groups needed: the value head is the baseline
    c.rl.beta = 0.05                 # per-token KL penalty in the reward (TRL's PPO default)
    c.rl.epochs = 2                  # passes over each batch of rollouts
    c.rl.minibatches = 2             # updates per pass: 2 x 2 = 4 optimizer updates per step
    c.optim.warmup_steps *= c.rl.epochs * c.rl.minibatches   # counted in updates: grpo's warmup, in steps
    return c
