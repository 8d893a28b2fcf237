"""SentencePiece's `ModelProto` message class, whatever protobuf runtime is installed.

sentencepiece ships `sentencepiece_model_pb2`, generated code that refuses to import under a protobuf runtime
older than the one that generated it (sentencepiece 0.2.3's file wants protobuf >= 7, while apache-beam pins
protobuf < 7). The schema itself is runtime-independent: when the import fails we build the classes from the
serialized file descriptor embedded in that same file, in a private descriptor pool.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import types

_PB2 = "sentencepiece.sentencepiece_model_pb2"


@functools.lru_cache(maxsize=None)
def _pb2_module() -> types.ModuleType:
    """The generated module, or an equivalent one rebuilt from its descriptor for this protobuf runtime."""
    try:
        return importlib.import_module(_PB2)
    except Exception:  # noqa: BLE001 - protobuf's VersionError (or an ImportError): rebuild from the descriptor
        pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    origin = importlib.util.find_spec(_PB2).origin
    tree = ast.parse(open(origin, encoding="utf-8").read())
    serialized = next(node.args[0].value for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile")
    pool = descriptor_pool.DescriptorPool()
    file = pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    module = types.ModuleType(_PB2, "sentencepiece_model_pb2 rebuilt by jaxllm for this protobuf runtime")
    module.DESCRIPTOR = file
    for name, message in file.message_types_by_name.items():
        setattr(module, name, message_factory.GetMessageClass(message))
    return module


def model_proto_class():
    """The `sentencepiece.ModelProto` class (its nested `SentencePiece`, enums and `TrainerSpec` included)."""
    return _pb2_module().ModelProto

