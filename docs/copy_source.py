"""The copy-the-source row of docs/llm.md: chrF and exact match of answering every held-out
prompt of a translations task with the English string itself, per language.

    python docs/copy_source.py configs/translations-floral.toml
"""

from __future__ import annotations

import sys

from floral.data import build_task
from floral.experiment import load_config
from floral.train.text_metrics import generation_metrics, generation_sums


def main(path: str) -> None:
    config = load_config(path)
    task = build_task(config.task, config.seed)
    by_cluster: dict[int, tuple[list[str], list[str]]] = {}
    for client in task.clients:
        if client.generation is None:
            raise SystemExit(f"{path}: not a task with held-out prompts (translations, jsonl)")
        sources, references = by_cluster.setdefault(client.cluster, ([], []))
        sources += client.generation.sources
        references += client.generation.references
    languages = config.task.languages
    for cluster, (sources, references) in sorted(by_cluster.items()):
        metrics = generation_metrics(generation_sums(sources, references))
        print(f"{languages[cluster]}: chrF {metrics['chrf']:.1f}, exact match "
              f"{metrics['exact_match']:.1f}% ({len(sources)} held-out strings)")
    everything = generation_metrics(generation_sums(
        [s for pair in by_cluster.values() for s in pair[0]],
        [r for pair in by_cluster.values() for r in pair[1]],
    ))
    print(f"all: chrF {everything['chrf']:.1f}, exact match {everything['exact_match']:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
