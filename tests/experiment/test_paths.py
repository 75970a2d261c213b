"""Paths contained: a run's name is a name, not a path, and a results folder that cannot be
written (a file in the way, no permission, a full disk) is one line naming the path, with
nothing written before lost and a run stopped by a full disk resumable from its last
checkpoint."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError
from support import ROOT
from support.experiment import TINY_FEDAVG as TINY

from floral import checkpoint as checkpoint_module
from floral.checkpoint import Checkpoint
from floral.cli import main
from floral.compare import parse_method_specs
from floral.experiment import check_name, read_experiment

NOSPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch) -> Path:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)  # results/<name> lands in tmp_path
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _run(tiny: Path, *args: str) -> int:
    return main(["run", str(tiny), "--quiet", *args])


def _error_line(capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- names ------------------------------------------------------------------------------------
BAD_NAMES = ["..", "../escape", "/abs", "/tmp/elsewhere", "a/b", "a/../b", "", ".", ".hidden",
             "-rf", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_a_path_is_refused_before_anything_is_written(tiny, tmp_path, capsys, name):
    assert _run(tiny, "--set", f"name={name}") == 2
    line = _error_line(capsys)
    assert line.startswith(f"floral: error: name: {name!r} is not a name (letters, digits"), line
    assert "folder under results/" in line
    assert _files(tmp_path) == ["tiny.toml"]  # no results/, nothing beside it


def test_a_bad_name_in_the_file_is_refused_too(tiny, tmp_path, capsys):
    tiny.write_text(TINY.replace('name = "tiny"', 'name = "../../escape"'))
    assert _run(tiny) == 2
    assert "name: '../../escape' is not a name" in _error_line(capsys)
    assert _files(tmp_path) == ["tiny.toml"]


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_grids_refuse_a_bad_task_name_before_anything_is_written(tiny, tmp_path, capsys, command):
    task = tmp_path / "task.toml"
    task.write_text(TINY.replace('name = "tiny"', 'name = "../up"'))
    code = main([command, str(task), "--methods", "fedavg", "--seeds", "0", "--quiet",
                 "--no-plots"])
    assert code == 2
    assert "'../up' is not a name" in _error_line(capsys)
    assert _files(tmp_path) == ["task.toml", "tiny.toml"]
    assert not (tmp_path.parent / "up").exists() and not (tmp_path.parent / "up-compare").exists()


def test_a_grid_refuses_a_name_set_for_its_runs(tiny, tmp_path, capsys):
    assert main(["compare", str(tiny), "--methods", "fedavg", "--quiet", "--no-plots",
                 "--set", "name=../../evil"]) == 2
    assert "name: '../../evil' is not a name" in _error_line(capsys)
    assert _files(tmp_path) == ["tiny.toml"]


@pytest.mark.parametrize("label", ["fedavg:output.dir=../../evil", "floral:rank=0.1",
                                   "fedavg:comm.upload=topk:0.1", "fedavg:x=/abs/../../y"])
def test_a_method_label_becomes_one_folder_inside_the_grid(label):
    (spec,) = parse_method_specs(label)
    assert spec.folder not in ("", ".", "..") and "/" not in spec.folder
    assert spec.folder.startswith(spec.name)  # a known method's name, checked before any run


def test_every_shipped_experiment_has_a_valid_name():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        check_name(read_experiment(path)["name"])


# -- --out that cannot be written ---------------------------------------------------------------
def test_out_naming_a_file_is_one_line_and_leaves_the_file(tiny, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    assert _run(tiny, "--out", str(blocker)) == 2
    assert _error_line(capsys) == (
        f"floral: error: cannot write {blocker}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_out_under_a_file_is_one_line(tiny, tmp_path, capsys):
    # Unwritable for root too: no permission bit lets a folder be made inside a regular file.
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker / "runs" / "tiny"
    assert _run(tiny, "--out", str(out)) == 2
    assert _error_line(capsys) == (
        f"floral: error: cannot write {out}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_out_in_a_place_nobody_may_write_is_one_line(tiny, capsys):
    out = Path("/sys/floral-results")  # sysfs refuses new folders, root included
    assert _run(tiny, "--out", str(out)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"floral: error: cannot write {out}: "), line
    assert not out.exists()


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root ignores permission bits")
def test_out_in_a_read_only_folder_is_one_line(tiny, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert _run(tiny, "--out", str(locked / "run")) == 2
        assert _error_line(capsys) == (f"floral: error: cannot write {locked / 'run'}: "
                                       f"{locked} is not writable (permission denied)")
    finally:
        locked.chmod(0o700)


def test_permission_refused_at_the_write_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "results" in self.parts:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert _run(tiny) == 2
    assert _error_line(capsys) == "floral: error: cannot write results/tiny: Permission denied"


# -- a full disk --------------------------------------------------------------------------------
class FullDisk:
    """A disk with room for `room` more files under `root`; each file written after that fails
    as on a full disk, with ENOSPC and part of it on disk. Files reach the disk through
    floral.checkpoint's helpers: bytes (`Path.write_bytes`) and tensors (safetensors'
    `save_file`, whose I/O errors are SafetensorErrors)."""

    def __init__(self, monkeypatch, root: Path, room: int) -> None:  # noqa: ANN001
        self.root, self.room, self.writes = root, room, 0
        write_bytes, save_file = Path.write_bytes, checkpoint_module.save_file

        def bytes_(path: Path, data: bytes) -> int:
            if self._full(path):
                write_bytes(path, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, NOSPACE, str(path))
            return write_bytes(path, data)

        def tensors(tensors, filename, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if self._full(Path(filename)):
                Path(filename).write_bytes(b"\0" * 10)  # a partial file, not counted
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)")
            return save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(Path, "write_bytes", bytes_)
        monkeypatch.setattr(checkpoint_module, "save_file", tensors)

    def _full(self, path: Path) -> bool:
        if self.root not in path.parents or self.room < 0:
            return False
        self.writes += 1
        return self.writes > self.room


def _asides(folder: Path) -> list[str]:
    return [name for name in _files(folder) if name.endswith(".tmp")]


def test_a_full_disk_at_the_first_write_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    FullDisk(monkeypatch, out, room=0)
    assert _run(tiny, "--out", str(out)) == 2
    assert _error_line(capsys) == f"floral: error: cannot write {out / 'config.toml'}: {NOSPACE}"
    assert _files(out) == []  # the half-written file removed


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:  # noqa: ANN001
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("whole")
    (folder / "tiny.toml").write_text(TINY)
    assert main(["run", str(folder / "tiny.toml"), "--quiet", "--out", str(folder / "o")]) == 0
    return folder / "o"


# Rounds 2, 4, 6 write metrics.csv then a checkpoint (state, progress, manifest); before them,
# config.toml, task.json and round 0's metrics.csv: the 8th to 11th writes are round 4's.
@pytest.mark.parametrize("room, fails", [(7, "metrics.csv"),
                                         (8, "checkpoint/state-4.safetensors"),
                                         (9, "checkpoint/progress-4.json"),
                                         (10, "checkpoint/manifest.json")])
def test_a_disk_full_at_a_later_round_stops_in_one_line_and_resumes_when_freed(
    tiny, tmp_path, capsys, monkeypatch, whole, room, fails
):
    out = tmp_path / "o"
    FullDisk(monkeypatch, out, room=room)
    assert _run(tiny, "--out", str(out)) == 2
    assert _error_line(capsys) == (
        f"floral: error: cannot write {out / fails}: {NOSPACE}; the checkpoint of round 2 in "
        f"{out / 'checkpoint'} is intact: rerun with --resume once the problem is fixed")
    assert _asides(out) == []
    state, progress = Checkpoint(out / "checkpoint").read()  # complete, checked against its SHAs
    assert progress["round"] == 2 == int(state["engine/round"])
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == (["0", "2"] if room == 7
                                                           else ["0", "2", "4"])
    assert not (out / "summary.json").exists()

    # Still full: resuming stops again, the same checkpoint kept.
    manifest = (out / "checkpoint" / "manifest.json").read_bytes()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    FullDisk(monkeypatch, out, room=0)
    assert _run(tiny, "--out", str(out), "--resume") == 2
    assert "checkpoint of round 2" in _error_line(capsys)
    assert (out / "checkpoint" / "manifest.json").read_bytes() == manifest

    monkeypatch.undo()  # the disk frees
    monkeypatch.chdir(tmp_path)
    assert _run(tiny, "--out", str(out), "--resume") == 0
    assert _asides(out) == []
    done, reference = (json.loads((folder / "summary.json").read_text()) for folder in (out, whole))
    assert done["final"] == pytest.approx(reference["final"])
    assert _without_seconds(out / "metrics.csv") == _without_seconds(whole / "metrics.csv")


def test_a_full_disk_in_a_grid_is_one_line_naming_the_run(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    FullDisk(monkeypatch, out, room=2)  # grid.json and the run's config.toml
    assert main(["compare", str(tiny), "--methods", "fedavg", "--seeds", "0", "--quiet",
                 "--jobs", "1", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith("floral: error: tiny · fedavg seed 0: cannot write "), line
    assert line.endswith(NOSPACE)
    assert json.loads((out / "grid.json").read_text())["methods"] == ["fedavg"]
    assert _asides(out) == []


def _without_seconds(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("seconds")
    return [[v for i, v in enumerate(row) if i != drop] for row in rows]
