"""The shipped config files (`jaxllm train --config=<name>[:arg]`) and the model presets they share.

Each file's `get_config(arg)` builds the ConfigDict of every field from the dataclasses in jaxllm/config.py
and states only what differs from their defaults. The checkout's top-level `configs/` is this directory.
"""
