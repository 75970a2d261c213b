"""A node's built task kept on its disk: a hit equals a fresh build, any change rebuilds.

The expected tasks are built here with floral's builders directly (`build_task`, `node_task`),
never through the cache; `cached_task` is given a build function that counts its calls, so a
hit (no call) and a miss (one call) are told apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from support.flower import run_loopback, tiny_experiment  # noqa: E402

from floral.data import FederatedTask, build_task  # noqa: E402
from floral.engines.flower.client import TASK_CACHE, task_cache  # noqa: E402
from floral.engines.flower.node_data import NodeData, node_task  # noqa: E402
from floral.engines.flower.task_cache import MAX_ENTRIES, cached_task  # noqa: E402
from floral.errors import ConfigError  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402
from floral.run import run_experiment  # noqa: E402


def assert_same_task(got: FederatedTask, want: FederatedTask) -> None:
    assert (got.name, got.kind, got.input_shape, got.num_outputs, got.num_clusters) == (
        want.name, want.kind, want.input_shape, want.num_outputs, want.num_clusters)
    assert len(got.clients) == len(want.clients)
    for mine, theirs in zip(got.clients, want.clients, strict=True):
        assert (mine.client_id, mine.cluster) == (theirs.client_id, theirs.cluster)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            a, b = getattr(mine, name), getattr(theirs, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (mine.client_id, name)
        assert mine.generation == theirs.generation
    assert got.extras.keys() == want.extras.keys()
    for name, tensor in want.extras.items():
        assert torch.equal(got.extras[name], tensor), name
    assert (got.generation is None) == (want.generation is None)
    if want.generation is not None and got.generation is not None:
        for field in ("max_new_tokens", "template", "system", "prompt_template"):
            assert getattr(got.generation, field) == getattr(want.generation, field)
        assert got.generation.tokenizer.encode("héllo") == want.generation.tokenizer.encode(
            "héllo")


class Counted:
    """A build function that remembers how often it ran."""

    def __init__(self, build):
        self.build, self.calls = build, 0

    def __call__(self):
        self.calls += 1
        return self.build()


def _jsonl_setup(tmp_path):
    site = tmp_path / "site1"
    site.mkdir()
    lines = [json.dumps({"prompt": f"say {i}", "response": f"{i}!"}) for i in range(7)]
    (site / "mine.jsonl").write_text("\n".join(lines) + "\n")
    config = resolve_config({
        "name": "cache-jsonl", "seed": 2,
        "task": {"dataset": "jsonl", "shift": "none", "num_clients": 3, "num_clusters": 1,
                 "data_dir": "/nonexistent", "tokenizer": "bytes", "template": "plain",
                 "max_length": 16, "generate_tokens": 2},
        "model": {"name": "tiny-llama"},
        "method": {"name": "fedavg"},
    })
    return config, NodeData(str(site), 1)


def test_a_hit_equals_a_fresh_build_synthetic(tmp_path):
    config = resolve_config(tiny_experiment("floral"))
    want = build_task(config.task, config.seed)
    assert want.extras  # the synthetic task's generating tensors travel too
    build = Counted(lambda: build_task(config.task, config.seed))
    first = cached_task(tmp_path, config.task, config.seed, None, build)
    second = cached_task(tmp_path, config.task, config.seed, None, build)
    assert build.calls == 1
    assert_same_task(first, want)
    assert_same_task(second, want)
    # Read back on a 64-byte line, as built: MKL computes other bits on data that is not
    # (tests/test_alignment.py), and this cache was where Flower runs drifted from local ones.
    assert all(getattr(c, name).data_ptr() % 64 == 0 for c in second.clients
               for name in ("x_train", "y_train", "x_test", "y_test") if getattr(c, name).numel())
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]

    # Another seed is another task: built, and kept beside the first.
    other = Counted(lambda: build_task(config.task, config.seed + 1))
    assert_same_task(cached_task(tmp_path, config.task, config.seed + 1, None, other),
                     build_task(config.task, config.seed + 1))
    assert other.calls == 1 and len(list(tmp_path.glob("*.json"))) == 2


def test_a_hit_equals_a_fresh_build_node_local_jsonl_and_changed_data_rebuilds(tmp_path):
    config, data = _jsonl_setup(tmp_path)
    cache = tmp_path / "cache"
    build = Counted(lambda: node_task(config.task, config.seed, data))
    cached_task(cache, config.task, config.seed, data, build)
    hit = cached_task(cache, config.task, config.seed, data, build)
    assert build.calls == 1
    want = node_task(config.task, config.seed, data)
    assert want.clients[1].generation is not None and want.generation is not None
    assert_same_task(hit, want)

    # The node's file changes: the entry no longer fits it.
    file = tmp_path / "site1" / "mine.jsonl"
    file.write_text(file.read_text() + json.dumps({"prompt": "new", "response": "row"}) + "\n")
    changed = cached_task(cache, config.task, config.seed, data, build)
    assert build.calls == 2
    assert_same_task(changed, node_task(config.task, config.seed, data))
    assert len(changed.clients[1].y_train) + len(changed.clients[1].y_test) == 8

    # Same size, only touched: still a change (mtime), so built again.
    os.utime(file, ns=(1, 1))
    cached_task(cache, config.task, config.seed, data, build)
    assert build.calls == 3

    # Another client index on the same folder: another task.
    other = NodeData(data.path, 2)
    got = cached_task(cache, config.task, config.seed, other, build := Counted(
        lambda: node_task(config.task, config.seed, other)))
    assert build.calls == 1 and got.clients[2].num_train > 0 and got.clients[1].num_train == 0


@pytest.mark.parametrize("damage", ["truncated-tensors", "garbage-json", "tensors-missing",
                                    "foreign-json"])
def test_a_damaged_entry_is_rebuilt_not_a_crash(tmp_path, damage):
    config = resolve_config(tiny_experiment("fedavg"))
    build = Counted(lambda: build_task(config.task, config.seed))
    cached_task(tmp_path, config.task, config.seed, None, build)
    (tensors,) = tmp_path.glob("*.safetensors")
    (meta,) = tmp_path.glob("*.json")
    if damage == "truncated-tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "garbage-json":
        meta.write_text("{not json")
    elif damage == "tensors-missing":
        tensors.unlink()
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "0" * 64}))
    got = cached_task(tmp_path, config.task, config.seed, None, build)
    assert build.calls == 2
    assert_same_task(got, build_task(config.task, config.seed))
    again = cached_task(tmp_path, config.task, config.seed, None, build)  # rewritten: a hit
    assert build.calls == 2
    assert_same_task(again, build_task(config.task, config.seed))


def test_entries_are_bounded(tmp_path):
    config = resolve_config(tiny_experiment("fedavg"))
    for seed in range(MAX_ENTRIES + 2):
        cached_task(tmp_path, config.task, seed, None, lambda s=seed: build_task(config.task, s))
    assert len(list(tmp_path.glob("*.json"))) == MAX_ENTRIES
    assert len(list(tmp_path.glob("*.safetensors"))) == MAX_ENTRIES
    assert not list(tmp_path.glob("*.tmp"))


def test_the_node_config_names_the_cache():
    assert task_cache({}) is None
    assert task_cache({"state-dir": "/srv/n0"}) == Path("/srv/n0") / TASK_CACHE
    assert task_cache({"state-dir": "/srv/n0", "task-cache": False}) is None
    with pytest.raises(ConfigError, match="task-cache must be true or false"):
        task_cache({"state-dir": "/srv/n0", "task-cache": "yes"})


def test_nodes_that_cache_their_task_end_with_the_local_engines_numbers(tmp_path):
    config = resolve_config(tiny_experiment("floral"), ["train.rounds=3"])
    local = run_experiment(config, tmp_path / "local")
    nodes = tmp_path / "nodes"
    summary, _ = run_loopback(config, tmp_path / "flower", state_dir=nodes)
    for k in range(config.task.num_clients):  # every node wrote its entry
        assert len(list((nodes / f"node{k}" / TASK_CACHE).glob("*.json"))) == 1
    assert summary.final == pytest.approx(local.final, rel=1e-6)
