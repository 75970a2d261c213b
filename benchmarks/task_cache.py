"""What a node's task cache saves a fresh ClientApp process (floral.engines.flower.task_cache).

    python benchmarks/task_cache.py [--repeat 5] [--rows 2000]

A deployed ClientApp without a warm worker starts in a fresh Python process for every message
and builds its runtime (task, model, method) from the experiment. This times, in fresh
processes as a message pays it, `floral.flower_app.runtime_for` without the cache and with a
warm one, for two tasks: the example app's synthetic-MLP experiment (a partition of the
experiment's task) and a node-local jsonl task (`--rows` prompt/response lines in the node's
folder, tiny-llama, byte tokenizer). Runs alternate between the two modes; the medians of
`--repeat` runs are printed: the whole process (interpreter, imports, runtime), and its task
step alone (built, or loaded from the cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from floral.config import tomllib  # noqa: E402
from floral.engines.flower.options import experiment_from_run_config  # noqa: E402
from floral.experiment import resolve_config  # noqa: E402

CHILD = """
import sys, time
start = time.perf_counter()
from pathlib import Path
import floral.flower_app as app
from floral.engines.flower.node_data import NodeData
spent = []
def timed(step):
    def run(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - begin)
    return run
# The task step of runtime_for, whichever it takes: built, or loaded from the cache.
app.build_task, app.node_task, app.cached_task = map(
    timed, (app.build_task, app.node_task, app.cached_task))
text = Path(sys.argv[1]).read_text()
data = NodeData(sys.argv[2], 0) if sys.argv[2] else None
cache = Path(sys.argv[3]) if sys.argv[3] else None
app.runtime_for(text, "cpu", data, cache)
print(time.perf_counter() - start, spent[-1])
"""


def _flat(table: dict, prefix: str = "") -> dict:
    """TOML's nested tables as the dotted keys of a Flower run config."""
    flat: dict = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mlp_experiment() -> str:
    app = tomllib.loads((ROOT / "examples/flower-app/pyproject.toml").read_text())
    data, overrides = experiment_from_run_config(_flat(app["tool"]["flwr"]["app"]["config"]))
    return tomli_w.dumps(resolve_config(data, overrides).to_dict())


def jsonl_experiment(work: Path, rows: int) -> tuple[str, Path]:
    site = work / "site0"
    site.mkdir()
    with (site / "client.jsonl").open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"Question {i}: what is {i} plus {i % 7}?",
                                "response": f"The answer is {i + i % 7}."}) + "\n")
    config = resolve_config({
        "name": "bench-jsonl",
        "task": {"dataset": "jsonl", "shift": "none", "num_clients": 2, "num_clusters": 1,
                 "data_dir": str(site), "tokenizer": "bytes", "template": "plain",
                 "max_length": 64, "generate_tokens": 8},
        "model": {"name": "tiny-llama"},
        "method": {"name": "floral", "rank": 2, "num_adaptors": 2, "train_base": False,
                   "bias": False, "include": ["*.q_proj", "*.v_proj"]},
    })
    return tomli_w.dumps(config.to_dict()), site


def fresh(text_file: Path, data: str, cache: str) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(text_file), data, cache],
                          capture_output=True, text=True, check=True)
    total, build = map(float, done.stdout.split())
    return total, build


def measure(name: str, text: str, data: str, work: Path, repeat: int) -> None:
    text_file = work / f"{name}.toml"
    text_file.write_text(text)
    cache = work / f"{name}-cache"
    fresh(text_file, data, str(cache))  # writes the entry: every later run is a hit
    times: dict[str, list[tuple[float, float]]] = {"no cache": [], "cache hit": []}
    for _ in range(repeat):
        times["no cache"].append(fresh(text_file, data, ""))
        times["cache hit"].append(fresh(text_file, data, str(cache)))
    size = sum(p.stat().st_size for p in cache.iterdir()) / 1e6
    print(f"{name} (cache entry {size:.2f} MB):")
    for mode, runs in times.items():
        total = statistics.median(t for t, _ in runs)
        build = statistics.median(b for _, b in runs)
        print(f"  {mode:9}  process {total:6.3f} s   of which the task {build:6.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        measure("synthetic-mlp (example app)", mlp_experiment(), "", work, args.repeat)
        text, site = jsonl_experiment(work, args.rows)
        measure(f"jsonl, node-local, {args.rows} rows", text, str(site), work, args.repeat)


if __name__ == "__main__":
    main()
