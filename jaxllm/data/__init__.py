"""Data: text sources → documents → token streams → packed, batched rows (Grain pipelines)."""
from jaxllm.data.packing import PackDatasetIterator, PackIterDataset, documents_to_rows
from jaxllm.data.pipeline import lm_pipeline
from jaxllm.data.sources import load_documents, split_heldout

__all__ = ["PackDatasetIterator", "PackIterDataset", "documents_to_rows", "lm_pipeline", "load_documents",
           "split_heldout"]
