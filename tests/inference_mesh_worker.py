"""Run by tests/test_inference_mesh.py in a fresh process with 8 fake CPU devices (XLA_FLAGS must be set before
jax is imported). Runs `jaxllm eval ppl` and `jaxllm generate` on a fsdp=4 x tensor=2 mesh and prints one JSON line:
the ppl report, the generated text and the per-device shard shapes of the loaded weights."""
import contextlib
import io
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from jaxllm.eval import cli  # noqa: E402
from jaxllm.inference import inference_mesh, load_for_inference  # noqa: E402

checkpoint, text_file, out_dir = sys.argv[1:4]
assert jax.device_count() == 8, jax.devices()
mesh_flags = ["--fsdp=4", "--tensor=2"]
cli.main(["ppl", f"--checkpoint={checkpoint}", f"--text={text_file}", f"--out={out_dir}/ppl.json", "--window=32",
          *mesh_flags])
generated = io.StringIO()
with contextlib.redirect_stdout(generated):
    cli.generate_main([f"--checkpoint={checkpoint}", "--prompt=the model", "--temperature=0", "--template=none",
                       "--max_new_tokens=12", *mesh_flags])
params = load_for_inference(checkpoint, mesh=inference_mesh(4, 2)).params
shapes = {name: list(w.sharding.shard_shape(w.shape)) for name, w in
          (("embedding", params["embed"]["embedding"]), ("gate", params["layers"]["mlp"]["gate"]),
           ("q", params["layers"]["attn"]["q"]))}
# The same weights from their Hugging Face export, read straight into the mesh's shardings.
hf = load_for_inference(f"{out_dir}/hf", mesh=inference_mesh(4, 2)).params
hf_shapes = {"gate": list(hf["layers"]["mlp"]["gate"].sharding.shard_shape(hf["layers"]["mlp"]["gate"].shape))}
hf_diff = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(params)))
print(json.dumps({"ppl": json.load(open(f"{out_dir}/ppl.json")), "generated": generated.getvalue(),
                  "shapes": shapes, "hf_shapes": hf_shapes, "hf_diff": hf_diff}), flush=True)
