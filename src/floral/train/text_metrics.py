"""Metrics of generated text: chrF (Popović 2015, as sacreBLEU 2 computes it) and exact match.

chrF compares character n-grams (n = 1..6, whitespace removed) of a hypothesis and its
reference. A corpus's chrF is computed from the *sums* of every sentence's statistics (for each
order: hypothesis n-grams, reference n-grams, matches), so the statistics of clients add up
exactly and a cluster's chrF is that of all its clients' test sentences together, as
`sacrebleu.corpus_chrf` gives it. The F-score averages precision and recall over the orders
where both sides have n-grams (sacreBLEU's "effective order"), with beta = 2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "CHRF_BETA",
    "CHRF_ORDER",
    "chrf_keys",
    "chrf_score",
    "chrf_statistics",
    "generation_sums",
    "generation_metrics",
]

CHRF_ORDER = 6
CHRF_BETA = 2


def chrf_keys() -> list[str]:
    """Names of the summed statistics: chrf_<what><order> for what in hyp, ref, match."""
    return [f"chrf_{what}{n}" for n in range(1, CHRF_ORDER + 1) for what in ("hyp", "ref", "match")]


def _ngrams(text: str, n: int) -> Counter[str]:
    line = "".join(text.split())
    return Counter(line[i : i + n] for i in range(len(line) - n + 1))


def chrf_statistics(hypothesis: str, reference: str) -> list[int]:
    """[hyp, ref, match] n-gram counts for n = 1..6, flattened (18 numbers)."""
    stats: list[int] = []
    for n in range(1, CHRF_ORDER + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items() if gram in ref)
        # An order the reference lacks counts no hypothesis n-grams either (as sacreBLEU).
        stats.extend((sum(hyp.values()) if ref else 0, sum(ref.values()), matches))
    return stats


def chrf_score(stats: Sequence[float]) -> float:
    """chrF (0-100) from summed statistics."""
    factor = CHRF_BETA**2
    precision = recall = 0.0
    orders = 0
    for n in range(CHRF_ORDER):
        hyp, ref, match = stats[3 * n : 3 * n + 3]
        if hyp > 0 and ref > 0:
            precision += match / hyp
            recall += match / ref
            orders += 1
    if orders == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    if precision + recall == 0:
        return 0.0
    return 100.0 * (1 + factor) * precision * recall / (factor * precision + recall)


def generation_sums(hypotheses: Iterable[str], references: Iterable[str]) -> dict[str, float]:
    """What a client reports of its generations: counts that add up across clients."""
    sums = dict.fromkeys(["generated", "exact", *chrf_keys()], 0.0)
    keys = chrf_keys()
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        sums["generated"] += 1
        sums["exact"] += float(hypothesis.strip() == reference.strip())
        for key, value in zip(keys, chrf_statistics(hypothesis, reference), strict=True):
            sums[key] += value
    return sums


def generation_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """chrF and exact match (%) from summed `generation_sums`."""
    count = sums.get("generated", 0.0)
    if count <= 0:
        return {}
    return {
        "chrf": chrf_score([sums[k] for k in chrf_keys()]),
        "exact_match": 100.0 * sums["exact"] / count,
    }
