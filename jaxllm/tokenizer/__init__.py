"""SentencePiece tokenizers: the `Tokenizer` wrapper and `train_tokenizer`."""
from jaxllm.tokenizer.tokenizer import Tokenizer
from jaxllm.tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "train_tokenizer"]
