"""Errors in the user's data, out of DataLoader worker processes as they were raised.

A DataLoader re-raises an exception from one of its workers as a new one whose message is
"Caught ValueError in DataLoader worker process 1. Original Traceback ...", burying the message
that names the bad file. Wrapped in `CaughtErrors` (map-style datasets) or `CaughtStreamErrors`
(iterable ones), a dataset hands such an error back as its item instead; `collate_caught` keeps
it through batching; `raise_caught`, in the main process, raises it as it was. Evaluation and
training loaders share this. Errors other than DATA_ERRORS (bugs) are left to torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Dataset, IterableDataset, default_collate

# What readers raise for bad data: a mask whose size differs from its image's, values outside
# the classes, a corrupt or missing file.
DATA_ERRORS = (ValueError, OSError)


class CaughtErrors(Dataset):
    """`dataset`'s items by key, or the DATA_ERRORS reading one raised, as the item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: object) -> object:
        try:
            return self.dataset[key]
        except DATA_ERRORS as error:
            return error


class CaughtStreamErrors(IterableDataset):
    """`stream`'s items; a DATA_ERRORS raised while reading it is its last item."""

    def __init__(self, stream: IterableDataset) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[object]:
        try:
            yield from self.stream
        except DATA_ERRORS as error:
            yield error


def collate_caught(items: Sequence[object]) -> object:
    """A batch of items as `default_collate` makes it, or the first caught error among them."""
    error = next((item for item in items if isinstance(item, Exception)), None)
    return default_collate(items) if error is None else error


def raise_caught(item: object) -> object:
    """`item` (a sample or batch), or, if it is a caught error, that error raised here.

    Raises:
        ValueError, OSError: the error a worker caught reading the data.
    """
    if isinstance(item, Exception):
        raise item
    return item
