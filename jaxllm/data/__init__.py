"""Data: sources → documents → token streams → mixed, packed, batched rows (Grain pipelines)."""
from jaxllm.data.mixture import Component, Mixture, mixture_stats
from jaxllm.data.packing import PackDatasetIterator, PackIterDataset, documents_to_rows
from jaxllm.data.pipeline import lm_pipeline, total_lanes
from jaxllm.data.sources import Source, load_documents, open_source, split_heldout, split_records

__all__ = ["Component", "Mixture", "PackDatasetIterator", "PackIterDataset", "Source", "documents_to_rows",
           "lm_pipeline", "load_documents", "mixture_stats", "open_source", "split_heldout", "split_records",
           "total_lanes"]
