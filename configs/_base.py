"""Loads configs/pretrain.py as the shared base of the post-training configs (config files are loaded by
path, not imported as a package)."""
import importlib.util
import os


def pretrain_config(arg: str):
    spec = importlib.util.spec_from_file_location("jaxllm_pretrain_config",
                                                  os.path.join(os.path.dirname(__file__), "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg), module.parse_arg(arg)
