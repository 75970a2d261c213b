"""Tensors read from a file or a message start where torch's own would: on a 64-byte line.

MKL's GEMM picks its kernel by where the data starts on some CPUs (AMD EPYC with AVX-512 among
them), so a client whose data or state was read back from safetensors (8-byte aligned) computed
other last bits than one that never stored it, and Flower runs drifted from local ones by ~1e-8
after a node restart. Every reader hands out aligned tensors; these tests fail on any CPU when
one does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from floral.checkpoint import load_tensors, save_tensors
from floral.train.state import ALIGNMENT, aligned


def _odd_sizes() -> dict[str, torch.Tensor]:
    # Sizes that are no multiple of 16 values put every tensor after the first off its line.
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate((3, 5, 7, 10, 13))}


def _all_aligned(tensors: dict[str, torch.Tensor]) -> bool:
    return all(t.data_ptr() % ALIGNMENT == 0 for t in tensors.values() if t.numel())


def test_safetensors_alone_hands_out_tensors_off_their_line(tmp_path: Path) -> None:
    # The premise of the fix: without it, the files floral reads give misaligned tensors.
    path = tmp_path / "t.safetensors"
    save_file(_odd_sizes(), str(path))
    assert not _all_aligned(load_file(str(path)))


def test_aligned_copies_only_what_is_off_its_line() -> None:
    buffer = torch.arange(40, dtype=torch.float32)
    on, off = buffer[:16], buffer[2:18]  # 0 and 8 bytes past the allocation's start
    got = aligned({"on": on, "off": off})
    assert got["on"] is on
    assert got["off"].data_ptr() % ALIGNMENT == 0 and torch.equal(got["off"], off)


def test_checkpoint_files_read_back_aligned(tmp_path: Path) -> None:
    tensors = _odd_sizes()
    save_tensors(tensors, tmp_path / "state.safetensors")
    got = load_tensors(tmp_path / "state.safetensors")
    assert _all_aligned(got)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_a_product_of_read_back_data_equals_the_one_never_stored(tmp_path: Path) -> None:
    # Small GEMMs (the shapes of the paper's synthetic tasks) are where MKL's kernels differ.
    gen = torch.Generator().manual_seed(1)
    # Rows of 7 give the tensors other offsets modulo 16 bytes in the file.
    x = {f"x{i}": torch.randn(7, 10 + i, generator=gen) for i in range(4)}
    w = {f"x{i}": torch.randn(3, 10 + i, generator=gen) for i in range(4)}
    save_tensors(x, tmp_path / "x.safetensors")
    got = load_tensors(tmp_path / "x.safetensors")
    for name, value in x.items():
        assert torch.equal(got[name] @ w[name].T, value @ w[name].T), name


def test_flower_records_and_node_state_read_back_aligned(tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("flwr")
    from floral.engines.flower.records import from_record, to_record
    from floral.engines.flower.store import DiskStore

    tensors = _odd_sizes()
    assert _all_aligned(from_record(to_record(tensors)))
    store = DiskStore(tmp_path, "0" * 32)
    store.write(0, 1, tensors, keep=1)
    got = store.read(0, 1)
    assert got is not None and _all_aligned(got)
