"""Instruction tuning (SFT) on Alpaca / BELLE / ShareGPT / OpenAI-messages records, loss on answers only.

Run:
  jaxllm train --config=sft:model=tiny --config.init_from=<checkpoint or HF dir> \
      --config.data.train=alpaca.json --config.workdir=/tmp/sft

init_from is the pretrained model (a jaxllm checkpoint or a Hugging Face dir; its tokenizer comes along).
data.train: instruction files (JSON array or JSON Lines), layout detected per file (data.format); data.eval:
held-out files, or empty to hold out data.eval_fraction of the records. Samples are packed several per row,
never attending to each other (data.pack). Arguments: `model=<preset>` (default tiny), `template=auto|alpaca|
alpaca_zh|chat|chatml|qwen2.5|llama3|llama2` (e.g. `--config=sft:model=125m,template=chatml`; auto, the default,
is init_from's own chat template, else alpaca). Every other field is configs/pretrain.py's.
"""
from jaxllm.configs.post_training import post_training_config


def get_config(arg: str = ""):
    c, tiny = post_training_config(arg, seq_len=(512, 2048), eval_fraction=0.05)
    c.objective = "sft"              # next-token loss on assistant tokens only
    c.optim.lr = 1e-3 if tiny else 2e-5                           # fine-tuning: a smaller peak
    c.optim.warmup_steps = 20 if tiny else 100                    # linear warmup from 0
    c.train.steps = 200 if tiny else 3000                         # optimizer updates
    return c
