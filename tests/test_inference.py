"""load_for_inference: a run workdir, one of its steps, a converted checkpoint and a Hugging Face directory all
give the same model (checked against transformers' own Llama) and tokenizer; a run gives its template too."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


from jaxllm import config as config_lib  # noqa: E402
from jaxllm.checkpoint import RunCheckpointer  # noqa: E402
from jaxllm.weights import save_params  # noqa: E402
from jaxllm.config import Config, DataConfig  # noqa: E402
from jaxllm.inference import inference_mesh, load_for_inference  # noqa: E402
from jaxllm.model.convert import from_hf  # noqa: E402
from jaxllm.model.transformer import forward  # noqa: E402
from jaxllm.tokenizer import Tokenizer  # noqa: E402

VOCAB = 512          # the conftest tokenizer's
STEP = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_path):
    """One random HF Llama saved in the four forms; returns their paths and the torch model."""
    root = tmp_path_factory.mktemp("forms")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2)   # large init: logits that differ token to token
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    model.save_pretrained(root / "hf", safe_serialization=True)
    shutil.copyfile(tokenizer_path, root / "hf" / "tokenizer.model")
    params, model_cfg = from_hf(root / "hf")
    save_params(str(root / "converted"), params, model_cfg, tokenizer_path)
    # A run workdir as the trainer leaves it: its resolved config, its tokenizer, an Orbax step of the state.
    run = root / "run"
    run_cfg = Config(model=model_cfg, data=DataConfig(template="chat"), objective="sft", workdir=str(run))
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_lib.to_dict(run_cfg)))
    shutil.copyfile(tokenizer_path, run / "tokenizer.model")
    ckpt = RunCheckpointer(str(run), async_save=False)
    ckpt.save(STEP, {"params": params, "step": np.int32(STEP)}, None)
    ckpt.close()
    return {"hf": root / "hf", "converted": root / "converted", "run": run,
            "step": run / "checkpoints" / str(STEP)}, model


@pytest.mark.parametrize("form", ["run", "step", "converted", "hf"])
def test_every_checkpoint_form_gives_the_same_logits_as_transformers(checkpoints, tokenizer_path, form):
    paths, torch_model = checkpoints
    model = load_for_inference(str(paths[form]), attention_impl="xla")
    assert model.cfg.attention_impl == "xla" and model.cfg.vocab_size == VOCAB
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = torch_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model.params, tokens, model.cfg)), expected, atol=1e-4, rtol=1e-4)
    text = "The quick brown fox jumps over the lazy dog."
    assert model.tokenizer.encode(text) == Tokenizer(tokenizer_path).encode(text)


def test_template_is_the_runs_for_post_training_and_none_otherwise(checkpoints, tmp_path):
    paths, _ = checkpoints
    assert load_for_inference(str(paths["run"])).template.name == "chat"
    assert load_for_inference(str(paths["step"])).template.name == "chat"
    assert load_for_inference(str(paths["converted"])).template is None
    assert load_for_inference(str(paths["hf"])).template is None
    # A pretraining run names a template in its config but never trained with one.
    pretrain = tmp_path / "pretrain"
    shutil.copytree(paths["run"], pretrain)
    run_config = json.loads((pretrain / "config.json").read_text())
    (pretrain / "config.json").write_text(json.dumps({**run_config, "objective": "lm"}))
    assert load_for_inference(str(pretrain)).template is None


def test_tokenizer_override_mesh_and_missing_tokenizer(checkpoints, tokenizer_path, tmp_path):
    paths, _ = checkpoints
    bare = tmp_path / "bare"
    shutil.copytree(paths["converted"], bare)
    (bare / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="bare carries no tokenizer"):
        load_for_inference(str(bare))
    mesh = inference_mesh()          # the training mesh's axes over this process's one device
    model = load_for_inference(str(bare), tokenizer=tokenizer_path, mesh=mesh)
    assert model.tokenizer.vocab_size == VOCAB
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(model.params))   # laid out on it
