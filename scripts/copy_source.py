"""The copy-the-source row of docs/llm.md: chrF and exact match of answering every held-out
prompt of a translations task with the English string itself, per language.

    python scripts/copy_source.py configs/translations-floral.toml
"""

from __future__ import annotations

import sys

from floral.data import build_task
from floral.experiment import ExperimentConfig, load_config
from floral.train.text_metrics import generation_metrics, generation_sums


def copy_scores(config: ExperimentConfig) -> dict[str, dict[str, float]]:
    """chrF and exact match of the copy, per language and over all ("all"), with the count."""
    task = build_task(config.task, config.seed)
    by_cluster: dict[int, tuple[list[str], list[str]]] = {}
    for client in task.clients:
        if client.generation is None:
            raise SystemExit(f"{config.name}: not a task with held-out prompts (translations)")
        sources, references = by_cluster.setdefault(client.cluster, ([], []))
        sources += client.generation.sources
        references += client.generation.references
    scores = {}
    for cluster, (sources, references) in sorted(by_cluster.items()):
        metrics = generation_metrics(generation_sums(sources, references))
        scores[config.task.languages[cluster]] = {**metrics, "count": len(sources)}
    every = generation_metrics(generation_sums(
        [s for pair in by_cluster.values() for s in pair[0]],
        [r for pair in by_cluster.values() for r in pair[1]],
    ))
    scores["all"] = {**every, "count": sum(len(pair[0]) for pair in by_cluster.values())}
    return scores


def main(path: str) -> None:
    scores = copy_scores(load_config(path))
    for language, metrics in scores.items():
        if language == "all":
            continue
        print(f"{language}: chrF {metrics['chrf']:.1f}, exact match "
              f"{metrics['exact_match']:.1f}% ({metrics['count']} held-out strings)")
    every = scores["all"]
    print(f"all: chrF {every['chrf']:.1f}, exact match {every['exact_match']:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
