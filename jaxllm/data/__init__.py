"""Data: sources → documents → token streams → mixed, packed, batched rows (Grain pipelines).

Names are re-exported lazily (PEP 562), so the data CLI's `--help` and the cleaning tools load no Grain."""
from __future__ import annotations

from jaxllm.lazy import lazy_exports

_EXPORTS = {
    "jaxllm.data.mixture": ("Component", "Mixture", "mixture_stats"),
    "jaxllm.data.packing": ("PackDatasetIterator", "PackIterDataset", "documents_to_rows"),
    "jaxllm.data.pipeline": ("lm_pipeline", "total_lanes"),
    "jaxllm.data.sources": ("Source", "load_documents", "open_source", "split_heldout", "split_records"),
}
__getattr__, __all__ = lazy_exports("jaxllm.data", globals(), _EXPORTS)
