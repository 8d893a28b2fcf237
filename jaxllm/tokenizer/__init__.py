"""Tokenizers: SentencePiece (`Tokenizer`) and Hugging Face tokenizer.json (`HFTokenizer`) behind one interface
(`load_tokenizer`), and `train_tokenizer` (SentencePiece BPE)."""
from jaxllm.tokenizer.tokenizer import HFTokenizer, Tokenizer, find_tokenizer_file, load_tokenizer
from jaxllm.tokenizer.train import train_tokenizer

__all__ = ["HFTokenizer", "Tokenizer", "find_tokenizer_file", "load_tokenizer", "train_tokenizer"]
