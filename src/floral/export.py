"""A finished run's adaptors as PEFT LoRA folders: each client's mixture, and the shared ones;
and what one client's model answers to new prompts (`floral generate`).

    from floral.export import export_run
    export_run("results/austen-floral", "adapters/austen-floral")

writes `client-<k>/` (client k's personalized adaptor: its mixture merged, rank C*r) for every
client, and `shared/adaptor-<c>/` (each shared adaptor alone, rank r) when the method has more
than one.
"""

from __future__ import annotations

from pathlib import Path

from floral.checkpoint import load_tensors
from floral.data import FederatedTask
from floral.engines.local import LocalEngine
from floral.errors import ConfigError
from floral.experiment import build_engine, load_config
from floral.llm.peft_io import export_peft, export_shared_peft

__all__ = ["export_run", "generate_answers"]


def _finished_engine(run: Path) -> tuple[LocalEngine, FederatedTask]:
    if not (run / "state.safetensors").is_file():
        raise ConfigError(f"{run}: no state.safetensors (not a finished run's results folder)")
    engine, task = build_engine(load_config(run / "config.toml"))
    engine.load_state_dict(load_tensors(run / "state.safetensors"))
    return engine, task


def generate_answers(run_dir: str | Path, client: int, prompts: list[str]) -> list[str]:
    """Client `client`'s answers to `prompts` (greedy, as in the run's evaluation), from the
    final state of a run of a prompt/response task (translations: a prompt is the English
    string; jsonl: a user message)."""
    engine, task = _finished_engine(Path(run_dir))
    if task.generation is None:
        raise ConfigError(f"{run_dir}: its task ({task.name}) does not generate text (a "
                          "translations or jsonl task with task.generate_tokens > 0 does)")
    if not 0 <= client < len(task.clients):
        raise ConfigError(f"--client: {client} is not a client of {run_dir} (0 to "
                          f"{len(task.clients) - 1})")
    model = engine.client_model(client)
    ids = [task.generation.prompt_ids(p) for p in prompts]
    return task.generation.generate(model, ids, engine.worker.placement)


def export_run(
    run_dir: str | Path, out_dir: str | Path, clients: list[int] | None = None
) -> list[Path]:
    """Export the final state of the run in `run_dir` (its config.toml and state.safetensors)."""
    run, out = Path(run_dir), Path(out_dir)
    engine, task = _finished_engine(run)
    ids = range(len(task.clients)) if clients is None else clients
    folders = [export_peft(engine.client_model(k), out / f"client-{k}") for k in ids]
    model = engine.client_model(0)
    if getattr(model, "floral_router", None) is not None:
        folders += export_shared_peft(model, out / "shared")
    return folders
