"""A Bradley-Terry reward model trained on preference pairs (prompt, chosen, rejected[, margin]).

Run:
  jaxllm train --config=reward:model=tiny --config.init_from=<checkpoint or HF dir> \
      --config.data.train=pairs.jsonl --config.workdir=/tmp/rm

init_from is the SFT or pretrained model; a scalar head is added on top. data.train: preference files
(prompt/chosen/rejected, LLaMA-Factory or MedicalGPT layouts); data.eval: held-out pairs, or empty to hold out
data.eval_fraction of them. Writes plots/reward_gap_hist_step*.png and plots/reward_gap_curve.png (the
chosen-minus-rejected gap on held-out pairs at every evaluation). Arguments: `model=<preset>` (default tiny),
`template=alpaca|alpaca_zh|chat` (the SFT model's). Every other field is configs/pretrain.py's.
"""
from jaxllm.configs import pretrain


def get_config(arg: str = ""):
    args = pretrain.parse_arg(arg, known=("model", "template"))
    model = args.get("model", "tiny")
    tiny = model == "tiny"
    c = pretrain.config_for_model(model)
    c.objective = "reward"           # -log σ(r_chosen − r_rejected − margin)
    c.data.eval_fraction = 0.1       # share of pairs held out when data.eval is empty
    c.data.template = args.get("template", "alpaca")  # prompt template, as in SFT
    c.data.overlong = "truncate_prompt"  # too long: cut the prompt from the left ("skip" drops the pair)
    c.data.seq_len = 256 if tiny else 1024                        # tokens per prompt + answer
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)   # positions up to data.seq_len
    c.reward.center = 0.01           # (r_c + r_r)² weight: keeps rewards near zero on average
    c.optim.lr = 1e-3 if tiny else 1e-5                           # peak learning rate
    c.optim.warmup_steps = 10 if tiny else 50                     # linear warmup from 0
    c.train.steps = 150 if tiny else 2000                         # optimizer updates
    c.train.batch_size = 16 if tiny else 64                       # pairs per step
    c.train.eval_every = 25 if tiny else 200                      # steps between gap plots
    c.train.eval_batches = 0         # all held-out pairs, so the histograms are complete
    c.train.eval_at_start = True     # the gap distribution before training (mean near 0)
    c.train.z_loss = 0.0             # no language-model logits to keep in check
    return c
