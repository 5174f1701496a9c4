"""PyTorch checkpoints (pytorch_model.bin, sharded pytorch_model-0000N-of-0000M.bin): the older Hugging Face
format, still what DialoGPT and many fine-tunes ship.

A .bin is a pickle, and unpickling can run any code the file names. These are only ever read with
`torch.load(weights_only=True)`, whose unpickler builds tensors, containers and plain values and
refuses everything else: a file that would call code is an error, never executed.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pagedserve.loader.safetensors import indexed_shards

_INDEX_FILE = "pytorch_model.bin.index.json"


def bin_files(folder: Path) -> list[Path]:
    """The weight files, from the shard index when there is one, else every pytorch_model*.bin; [] for none."""
    folder = Path(folder)
    index_file = folder / _INDEX_FILE
    if index_file.is_file():
        return indexed_shards(index_file)
    return sorted(folder.glob("pytorch_model*.bin"))


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """One .bin's tensors, unpickled weights-only (memory-mapped when the file is torch's zip format)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        raise ValueError(f"{file}: refused: unpickling it would run code, not only load tensors (only weights-only "
                         f"PyTorch checkpoints are loaded; convert it to safetensors): {error}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise ValueError(f"{file}: not a valid PyTorch checkpoint ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    return {str(name): tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def iter_bin_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every .bin file, in the dtype the file stores."""
    for file in bin_files(folder):
        yield from load_state_dict(file).items()


def num_bin_tensors(folder: Path) -> int:
    """How many tensors iter_bin_weights yields (memory-mapped, so cheap for zip-format files)."""
    return sum(len(load_state_dict(file)) for file in bin_files(folder))
