"""What the post-training configs (sft.py, reward.py, dpo.py) share: pretrain.py's model for the chosen preset,
reading records (instructions or preference pairs) through a prompt template instead of documents."""
from jaxllm.configs import pretrain


def post_training_config(arg: str, seq_len: tuple[int, int], eval_fraction: float):
    """(ConfigDict, whether the preset is tiny) for `arg` ('model=<preset>,template=<name>'); `seq_len` is
    (tiny preset, the others)."""
    args = pretrain.parse_arg(arg, known=("model", "template"))
    model = args.get("model", "tiny")
    tiny = model == "tiny"
    c = pretrain.config_for_model(model)
    c.data.eval_fraction = eval_fraction  # share of records held out when data.eval is empty
    c.data.template = args.get("template", "auto")  # "auto": init_from's own chat template, else alpaca
    c.data.overlong = "truncate_prompt"  # too long: cut the prompt from the left ("skip" drops the record)
    c.data.seq_len = seq_len[0] if tiny else seq_len[1]            # tokens per row
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)   # positions up to data.seq_len
    c.train.z_loss = 0.0             # pretraining's logit penalty: not needed after it
    return c, tiny
