"""Why a learned router finds the clusters or not: recovery, confidence and adaptor spread.

    python benchmarks/router_diagnosis.py results/diagnosis

For every finished run under the folder (any layout `floral sweep` or `compare` writes) it
prints: the final metric; the router's cluster recovery (ARI) and confidence (mean max pi) at
the end; the first evaluated round at which the ARI reached 0.9; how many clusters end up
sharing their majority adaptor with another cluster (merged: one adaptor serves both, and
another adaptor is left idle); and the adaptor spread, how different the C adaptors of the
final global state are from each other:

    spread = mean over pairs c != c' of ||D_c - D_c'|| / mean over c of ||D_c||,

with D_c = (B_c^T A_c, b_c) the change adaptor c makes to each adapted layer, all layers
concatenated. 0 means the adaptors collapsed into one function (a router cannot tell clients
apart with them); around 1.4 means as different as independent random ones.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from floral.plots import router_weights_of_run


def adaptor_changes(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(C, everything) the flattened change each adaptor makes, over all adapted layers."""
    parts = []
    for name, a in state.items():
        if not name.endswith(".lora_A"):
            continue
        prefix = name[: -len("lora_A")]
        b = state[prefix + "lora_B"]
        # Linear factors: A (C, r, d_in), B (C, r, d_out) -> B^T A (C, d_out, d_in).
        delta = torch.einsum("cro,cri->coi", b.flatten(2), a.flatten(2)).flatten(1)
        parts.append(delta)
        if prefix + "lora_bias" in state:
            parts.append(state[prefix + "lora_bias"].flatten(1))
    return torch.cat(parts, dim=1) if parts else None


def spread(changes: torch.Tensor) -> float:
    num = changes.shape[0]
    distances = torch.cdist(changes[None], changes[None])[0]
    mean_pair = distances.sum() / (num * (num - 1))
    mean_norm = changes.norm(dim=1).mean()
    return float(mean_pair / mean_norm) if mean_norm > 0 else 0.0


def first_round(rows: list[dict[str, str]], threshold: float = 0.9) -> str:
    for row in rows:
        if float(row.get("router_ari", "nan")) >= threshold:
            return row["round"]
    return "never"


def merged_clusters(run: Path) -> str:
    """Clusters whose majority adaptor (argmax pi) is also another cluster's majority adaptor."""
    router = router_weights_of_run(run)
    if router is None:
        return "-"
    choice = router.weights.argmax(axis=1)
    majority = [
        np.bincount(choice[router.clusters == c]).argmax() for c in np.unique(router.clusters)
    ]
    counts = np.bincount(majority)
    return str(int(sum(counts[m] > 1 for m in majority)))


def describe(run: Path) -> dict[str, str]:
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    state = load_file(run / "state.safetensors")
    changes = adaptor_changes({k[7:]: v for k, v in state.items() if k.startswith("global/")})
    final = summary["final"]
    metric = summary["metric"]
    return {
        "run": str(run),
        metric: f"{final[metric]:.4g}",
        "ARI": f"{final['router_ari']:.2f}" if "router_ari" in final else "-",
        "confidence": f"{final['router_confidence']:.2f}" if "router_confidence" in final else "-",
        "ARI>=0.9 at round": first_round(rows) if "router_ari" in final else "-",
        "merged clusters": merged_clusters(run),
        "adaptor spread": f"{spread(changes):.2f}" if changes is not None else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    runs = sorted(p.parent for p in args.results.rglob("summary.json"))
    table = [describe(run) for run in runs]
    if not table:
        raise SystemExit(f"no finished runs under {args.results}")
    columns = list(dict.fromkeys(k for row in table for k in row))
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for row in table:
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
