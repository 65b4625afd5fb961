"""Datasets: readers for the standard benchmark layouts, protocols, and the synthetic world."""

from zegkit.data.datasets import DATASETS, list_datasets, load_dataset
from zegkit.data.protocols import PROTOCOLS, get_protocol, list_protocols

__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "get_protocol",
    "list_datasets",
    "list_protocols",
    "load_dataset",
]
