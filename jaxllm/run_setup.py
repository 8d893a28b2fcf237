"""Everything a run settles before its first step: the resolved config, the tokenizer, the initial parameters
of init_from, the mesh and the workdir.

    config ──architecture of init_from──▶ tokenizer (given, init_from's, the workdir's, or trained)
      ──vocabulary fitted to the tokenizer (resized when init_from's is smaller)──▶ resolved config
      ──▶ workdir/config.json + tokenizer.model (+ chat_template.jinja), mesh

The resolved config is what workdir/config.json holds, so a resumed run restores the same shapes.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import jax

from jaxllm import distributed, hub, run_history, sharding, storage
from jaxllm.checkpoint import RUN_CONFIG_FILE, checkpoint_steps
from jaxllm.weights import describe_checkpoint, load_params_on_mesh
from jaxllm.config import Config, ConfigError, init_checkpoint
from jaxllm.data import templates
from jaxllm.model.resize import check_tokenizer_size, resize_vocab, resized_config, token_rows
from jaxllm.objectives.lm import lm_documents
from jaxllm.tokenizer import HFTokenizer, Tokenizer, find_tokenizer_file, load_tokenizer, train_tokenizer

# Fields of the run's model config that say how to compute, not what the weights are: these stay the run's
# own when the architecture comes from `init_from`.
RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "attention_impl", "attention_block", "remat", "scan_layers")


@dataclasses.dataclass(frozen=True)
class RunSetup:
    cfg: Config                   # resolved: init_from's architecture, the vocabulary fitted to the tokenizer
    tokenizer: Tokenizer | HFTokenizer
    init_tokenizer: str | None    # the tokenizer that init_from carries (subword_mean resizing reads it)
    mesh: jax.sharding.Mesh


def architecture_from_init(cfg: Config) -> tuple[Config, str | None]:
    """With init_from, the architecture is the checkpoint's (its shapes must load); returns the config and
    the checkpoint's tokenizer, if it carries one."""
    if not init_checkpoint(cfg):
        return cfg, None
    info = describe_checkpoint(cfg.init_from)
    runtime = {f: getattr(cfg.model, f) for f in RUNTIME_FIELDS}
    model = dataclasses.replace(info["model_cfg"], **runtime,
                                max_seq_len=max(info["model_cfg"].max_seq_len, cfg.data.seq_len))
    return dataclasses.replace(cfg, model=model), info["tokenizer"]


def tokenizer_for_run(cfg: Config, init_tokenizer: str | None = None) -> Tokenizer | HFTokenizer:
    """The configured tokenizer; else the init checkpoint's; else the one a previous run of this workdir
    trained; else train one on the training documents."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if init_tokenizer:
        return load_tokenizer(init_tokenizer)
    saved = find_tokenizer_file(cfg.workdir)
    if saved is None and jax.process_index() == 0:        # the others read it from the shared workdir
        logging.info("no tokenizer given: training a %d-piece SentencePiece BPE on the training documents",
                     cfg.tokenizer_vocab_size)
        train_docs, _ = lm_documents(cfg)
        train_tokenizer(train_docs, out_dir=cfg.workdir, vocab_size=cfg.tokenizer_vocab_size,
                        character_coverage=cfg.tokenizer_character_coverage)
    distributed.barrier("jaxllm_tokenizer")
    return load_tokenizer(cfg.workdir)


def fit_run_to_tokenizer(cfg: Config, tokenizer_size: int, init_tokenizer: str | None) -> Config:
    """Run config (model = the init_from checkpoint's) -> the config the run trains.

    A tokenizer larger than the checkpoint's vocabulary resizes the model config here, before any state exists,
    so workdir/config.json holds the resized model and a resumed run restores the same shapes;
    `load_init_params` then grows the loaded weights to match. With optim.trainable='new_rows' the first
    trainable row defaults to the checkpoint's vocabulary size."""
    rows = token_rows(cfg.model)
    optim = cfg.optim
    if init_checkpoint(cfg) and tokenizer_size > rows:
        if cfg.resize_method == "none":
            check_tokenizer_size(tokenizer_size, cfg.model, cfg.init_from)        # raises, naming both sizes
        if cfg.lora.rank and not cfg.lora.train_embeddings:
            raise ConfigError(f"lora.rank={cfg.lora.rank} with a tokenizer larger than init_from's vocabulary "
                              f"({tokenizer_size} > {rows}): the new rows would stay random in the frozen base. Set "
                              f"lora.train_embeddings=True (the embedding and head train beside the adapters), or "
                              f"train them first with a full-model stage (optim.trainable='new_rows')")
        if cfg.resize_method == "subword_mean" and not init_tokenizer:
            raise ConfigError(f"resize_method='subword_mean' needs the tokenizer.model of init_from "
                              f"({cfg.init_from}), which has none; use 'mean' or 'mean_noise'")
        model = resized_config(cfg.model, tokenizer_size, cfg.resize_pad_to_multiple)
        logging.info("vocabulary %d -> %d tokens (%d rows with padding), new rows by %r", rows, tokenizer_size,
                     model.vocab_size, cfg.resize_method)
        if optim.trainable == "new_rows" and not optim.new_rows_from:
            optim = dataclasses.replace(optim, new_rows_from=rows)
        cfg = dataclasses.replace(cfg, model=model, optim=optim)
    elif init_checkpoint(cfg) and tokenizer_size < rows:
        logging.warning("the tokenizer has %d pieces, fewer than the %d vocabulary rows of %s: the rows it never "
                        "produces stay untrained", tokenizer_size, rows, cfg.init_from)
    if optim.trainable == "new_rows" and not optim.new_rows_from:
        raise ConfigError("optim.trainable='new_rows' needs new rows: init_from a checkpoint whose vocabulary is "
                          "smaller than the tokenizer's (with resize_method set), or set optim.new_rows_from")
    return cfg


def resolve_model_vocab(cfg: Config, tokenizer: Tokenizer | HFTokenizer) -> Config:
    """model.vocab_size = 0 takes the tokenizer's size; a model smaller than its tokenizer is an error."""
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, {tokenizer.path})")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def saved_config(workdir) -> dict | None:
    """The workdir's config.json, or None when there is none."""
    path = workdir / RUN_CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); it should describe the run in this "
                          f"workdir: restore it, or use a new workdir") from None


def _same_template(cfg: Config, old: dict) -> bool:
    """Whether the saved run's data.template and this one's give the same template text: e.g. a run saved with
    "alpaca" resumed under the later default "auto" that resolves to alpaca is no change."""
    before = (old.get("data") or {}).get("template")
    if not isinstance(before, str) or before == cfg.data.template:
        return True
    try:
        init = init_checkpoint(cfg)
        return templates.run_template(before, init).source == templates.run_template(cfg.data.template, init).source
    except templates.TemplateError:
        return False


def prepare_workdir(cfg: Config, tokenizer: Tokenizer | HFTokenizer) -> None:
    """The resolved config and the tokenizer, written once (process 0) into the workdir. A workdir that already
    holds a run keeps describing its checkpoints: changes are refused or recorded (run_history.py)."""
    workdir = storage.as_path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    new, old = run_history.as_json(cfg), saved_config(workdir)
    saved_tokenizer = workdir / tokenizer.filename      # tokenizer.model, or a Hugging Face tokenizer.json
    same_tokenizer = storage.same_bytes(tokenizer.path, saved_tokenizer)
    changes, reason, newest = [], None, max(checkpoint_steps(workdir / "checkpoints"), default=None)
    if old is not None:
        changes, reason = run_history.check_config_change(workdir, old, new, newest, cfg.allow_config_change,
                                                          same_tokenizer, _same_template(cfg, old))
        run_history.warn_on_schedule_change(changes, cfg)
    if jax.process_index() == 0:
        if changes:
            run_history.record_config_change(workdir, old, changes, reason, newest,
                                             old_tokenizer=None if same_tokenizer else saved_tokenizer)
        if old is None or changes:
            storage.write_text(workdir / RUN_CONFIG_FILE, json.dumps(new, indent=2))
        if not storage.same_file(tokenizer.path, saved_tokenizer):
            tokenizer.save(workdir)


def save_run_template(cfg: Config) -> templates.ChatTemplate | None:
    """The run's chat template, written as <workdir>/chat_template.jinja (process 0) so generate, serve, score,
    judge and exports use the text it was trained with: a run of chat records (data.train) renders them with
    data.template ("auto": init_from's own, else alpaca); a run of documents passes init_from's own on."""
    init = init_checkpoint(cfg)
    if cfg.data.train:
        try:
            template, how = templates.run_template(cfg.data.template, init), f"data.template={cfg.data.template}"
        except templates.TemplateError as e:           # checked before any record is read or weight loaded
            raise ConfigError(f"data.template: {e}") from None
    else:
        template, how = templates.model_template(init), "init_from's own, passed on"
    if template is None:
        return None
    logging.info("chat template: %s; %s", template.describe(), how)
    if jax.process_index() == 0:
        templates.save_template(cfg.workdir, template)
    return template


def setup_run(cfg: Config) -> RunSetup:
    """The resolved config, tokenizer and mesh of a run; writes its workdir's config.json and tokenizer."""
    nproc = jax.process_count()
    if cfg.train.batch_size % nproc:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must divide across {nproc} processes")
    storage.as_path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    if init_checkpoint(cfg):    # a Hub id becomes its local snapshot, before anything reads init_from
        cfg = dataclasses.replace(cfg, init_from=hub.resolve_model_path(cfg.init_from))
    cfg, init_tokenizer = architecture_from_init(cfg)
    tokenizer = tokenizer_for_run(cfg, init_tokenizer)
    cfg = fit_run_to_tokenizer(cfg, tokenizer.vocab_size, init_tokenizer)   # init_from + a larger tokenizer
    cfg = resolve_model_vocab(dataclasses.replace(cfg, tokenizer=str(storage.absolute(tokenizer.path))), tokenizer)
    prepare_workdir(cfg, tokenizer)
    save_run_template(cfg)
    return RunSetup(cfg, tokenizer, init_tokenizer, sharding.make_mesh(cfg.mesh))


def load_init_params(setup: RunSetup) -> dict | None:
    """init_from's parameters, grown by `resize_vocab` when the run's tokenizer is larger than the checkpoint;
    None without init_from (the trainer initialises from the objective's specs)."""
    cfg, tokenizer = setup.cfg, setup.tokenizer
    if not init_checkpoint(cfg):
        return None
    params, init_model, _ = load_params_on_mesh(cfg.init_from, setup.mesh, cfg.mesh.rules)
    if token_rows(init_model) < tokenizer.vocab_size:
        params, _ = resize_vocab(params, init_model, tokenizer.vocab_size, cfg.resize_method,
                                 key=jax.random.key(cfg.train.seed), base_tokenizer=setup.init_tokenizer,
                                 new_tokenizer=tokenizer, pad_to_multiple=cfg.resize_pad_to_multiple)
    return params
