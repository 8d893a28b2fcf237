"""Run by tests/test_distributed_post_training.py: several `jaxllm train` configs in sequence in ONE process (so
the JAX start-up and distributed initialisation are paid once). The device count comes from XLA_FLAGS and the
process group from the JAXLLM_* environment, exactly as `jaxllm train` reads them. Argument: a JSON list of
flag lists, one per run."""
import json
import sys

from jaxllm import distributed
from jaxllm.cli import load_config
from jaxllm.trainer import train

distributed.initialize()
for flags in json.loads(sys.argv[1]):
    train(load_config(flags))
