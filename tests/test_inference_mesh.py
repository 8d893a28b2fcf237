"""eval ppl and generate on a mesh (--fsdp / --tensor) of 8 fake CPU devices: the weights load sharded as
training lays them out, and the results equal one device's."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxllm.weights import export_hf, save_params
from jaxllm.config import ModelConfig
from jaxllm.eval import cli
from jaxllm.model.spec import init_params


def test_eval_ppl_and_generate_on_a_sharded_mesh_equal_one_device(tmp_path, english_corpus, tokenizer_path):
    from jaxllm.tokenizer import load_tokenizer
    cfg = ModelConfig.preset("tiny", vocab_size=load_tokenizer(tokenizer_path).vocab_size, max_seq_len=64)
    checkpoint = save_params(str(tmp_path / "ckpt"), init_params(cfg, jax.random.key(0)), cfg, tokenizer_path)
    text = tmp_path / "text.txt"
    text.write_text(english_corpus.read_text()[:3000])
    cli.main(["ppl", f"--checkpoint={checkpoint}", f"--text={text}", f"--out={tmp_path}/ppl.json", "--window=32"])
    single_ppl = json.loads((tmp_path / "ppl.json").read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.generate_main([f"--checkpoint={checkpoint}", "--prompt=the model", "--temperature=0", "--template=none",
                           "--max_new_tokens=12"])
    export_hf(checkpoint, str(tmp_path / "hf"))
    worker = os.path.join(os.path.dirname(__file__), "inference_mesh_worker.py")
    run = subprocess.run([sys.executable, worker, checkpoint, str(text), str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = json.loads(run.stdout.strip().splitlines()[-1])
    one, many = single_ppl["sources"]["text.txt"], sharded["ppl"]["sources"]["text.txt"]
    assert many["tokens"] == one["tokens"] and many["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert sharded["generated"] == out.getvalue()
    # tiny: vocab V over tensor (2), embed 64 over fsdp (4), heads 4 over tensor, mlp 192 over tensor
    V = cfg.vocab_size
    assert sharded["shapes"] == {"embedding": [V // 2 if V % 2 == 0 else V, 16], "gate": [2, 16, 96],
                                 "q": [2, 16, 2, 16]}
    assert sharded["hf_shapes"] == {"gate": [2, 16, 96]} and sharded["hf_diff"] == 0.0   # HF read sharded too
