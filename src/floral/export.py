"""A finished run's adaptors as PEFT LoRA folders: each client's mixture, and the shared ones
(`floral export`); and what one client's model answers to new prompts (`floral generate`).

    from floral.export import export_run
    export_run("results/austen-floral", "adapters/austen-floral")
    # or: floral export results/austen-floral adapters/austen-floral

writes `client-<k>/` (client k's personalized adaptor: its mixture merged, rank C*r) for every
client, and `shared/adaptor-<c>/` (each shared adaptor alone, rank r) when the method has more
than one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from floral.checkpoint import load_tensors, read_json, read_toml
from floral.data import FederatedTask, outline_task
from floral.engines.local import LocalEngine
from floral.errors import ConfigError
from floral.experiment import TASK_FILE, build_engine, resolve_config
from floral.llm.peft_io import export_peft, export_shared_peft

__all__ = ["export_run", "generate_answers"]


def _finished_engine(run: Path) -> tuple[LocalEngine, FederatedTask]:
    """The run's engine at its final state. Its task is the outline the run recorded
    (`task.json`: no data is read, so this works from any folder, the training data moved or
    gone); a folder written before floral recorded it rebuilds the task from the data."""
    if not (run / "state.safetensors").is_file():
        raise ConfigError(f"{run}: no state.safetensors (not a finished run's results folder)")
    config = resolve_config(read_toml(run / "config.toml"))
    outline = run / TASK_FILE
    task = outline_task(read_json(outline)) if outline.is_file() else None
    engine, task = build_engine(config, task)
    engine.load_state_dict(load_tensors(run / "state.safetensors"))
    return engine, task


def generate_answers(
    run_dir: str | Path, client: int, prompts: list[str], system: str | None = None
) -> list[str]:
    """Client `client`'s answers to `prompts` (greedy, as in the run's evaluation), from the
    final state of a run of a prompt/response task (translations: a prompt is the English
    string; jsonl: a user message). Each prompt follows the run's `task.system` message, or
    `system` where given ("" = none): the system messages of a file's lines are the lines'."""
    engine, task = _finished_engine(Path(run_dir))
    if task.generation is None:
        raise ConfigError(f"{run_dir}: its task ({task.name}) does not generate text (a "
                          "translations or jsonl task with task.generate_tokens > 0 does)")
    _check_client(run_dir, task, client)
    model = engine.client_model(client)
    generation = task.generation if system is None else replace(task.generation, system=system)
    ids = [generation.prompt_ids(p) for p in prompts]
    return generation.generate(model, ids, engine.worker.placement)


def _check_client(run: str | Path, task: FederatedTask, client: int) -> None:
    if not 0 <= client < len(task.clients):
        raise ConfigError(f"--client: {client} is not a client of {run} (0 to "
                          f"{len(task.clients) - 1})")


def export_run(
    run_dir: str | Path, out_dir: str | Path, clients: list[int] | None = None
) -> list[Path]:
    """Export the final state of the run in `run_dir` (its config.toml and state.safetensors)."""
    run, out = Path(run_dir), Path(out_dir)
    engine, task = _finished_engine(run)
    ids = range(len(task.clients)) if clients is None else clients
    for k in ids:
        _check_client(run, task, k)
    folders = [export_peft(engine.client_model(k), out / f"client-{k}") for k in ids]
    model = engine.client_model(0)
    if getattr(model, "floral_router", None) is not None:
        folders += export_shared_peft(model, out / "shared")
    return folders
