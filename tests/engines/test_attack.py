"""The `[attack]` table: seeded attackers whose uploads or labels are corrupted, and what each
aggregation policy says it withstands."""

from __future__ import annotations

import pytest
import torch

from floral.engines.aggregation import Mean, Median, Trimmed, robust_upload, robustness_warning
from floral.engines.attack import AttackConfig, attackers
from floral.errors import ConfigError
from floral.experiment import build_engine, resolve_config
from floral.methods.base import WEIGHT_SUFFIX


def _config(**attack: object) -> dict:
    return {
        "name": "attacked", "seed": 4,
        "task": {"dataset": "digits", "shift": "none", "num_clients": 10, "num_clusters": 1},
        "model": {"name": "mlp", "hidden": [16]},
        "method": {"name": "fedavg"},
        "train": {"rounds": 2, "clients_per_round": 1.0, "batch_size": 16, "lr": 0.05},
        "attack": attack,
    }


def _uploads(config: dict) -> dict[int, dict[str, torch.Tensor]]:
    engine, task = build_engine(resolve_config(config))
    private = {k: engine.local.private_state(k) for k in range(len(task.clients))}
    return {k: u.upload for k, u in engine.worker.train(1, engine.global_state, private).items()}


def test_attackers_are_a_seeded_fraction():
    config = AttackConfig(kind="noise", fraction=0.3)
    chosen = attackers(config, 10, seed=4)
    assert len(chosen) == 3 and chosen == attackers(config, 10, seed=4)
    assert attackers(config, 10, seed=5) != chosen or len(chosen) == 10
    assert attackers(AttackConfig(), 10, seed=4) == frozenset()


@pytest.mark.parametrize(("kind", "factor"), [("sign-flip", -10.0), ("scale", 10.0)])
def test_only_the_attackers_uploads_change_and_by_the_factor(kind, factor):
    clean = _uploads(_config())
    attacked = _uploads(_config(kind=kind, fraction=0.2))
    bad = attackers(AttackConfig(kind=kind, fraction=0.2), 10, seed=4)
    for k, upload in clean.items():
        for name, value in upload.items():
            expected = value if k not in bad or name.endswith(WEIGHT_SUFFIX) else factor * value
            torch.testing.assert_close(attacked[k][name], expected, rtol=1e-6, atol=1e-7)


def test_label_flip_trains_the_attackers_on_flipped_labels():
    engine, task = build_engine(resolve_config(_config(kind="label-flip", fraction=0.2)))
    clean, _ = build_engine(resolve_config(_config()))
    bad = attackers(AttackConfig(kind="label-flip", fraction=0.2), 10, seed=4)
    for k, client in enumerate(engine.task.clients):
        original = clean.task.clients[k]
        want = 9 - original.y_train if k in bad else original.y_train
        assert torch.equal(client.y_train, want)
        assert torch.equal(client.y_test, original.y_test)  # test data stays clean


@pytest.mark.parametrize(("attack", "words"), [
    ({"kind": "sign-flip"}, "attack.fraction: attack.kind = 'sign-flip' needs a fraction"),
    ({"kind": "sign-flip", "fraction": 1.0}, "attack.fraction: must be in [0, 1)"),
    ({"kind": "flood", "fraction": 0.1}, "attack.kind: unknown 'flood'"),
])
def test_bad_attack_settings_are_one_line_errors(attack, words):
    with pytest.raises(ConfigError) as error:
        resolve_config(_config(**attack))
    assert str(error.value).startswith(words.split(":")[0]) and words in str(error.value)


def test_what_each_policy_withstands_holds_against_bad_updates():
    # Declared reach against the statistic itself: k - w good updates and w huge ones on one
    # side; the policy's result stays within the good ones' range exactly when w <= withstands.
    g = torch.Generator().manual_seed(0)
    for policy in (Median(), Trimmed(0.2), Trimmed(0.1)):
        for k in (5, 7, 10):
            for w in range(k):
                good = torch.rand(k - w, 6, generator=g)
                updates = [*good, *(1e6 * torch.ones(w, 6))]
                uploads = [{"t": u, "t" + WEIGHT_SUFFIX: torch.tensor(1.0)} for u in updates]
                result = robust_upload(uploads, policy.rule())["t"] / k
                inside = bool((result <= good.max(0).values + 1e-6).all())
                assert inside == (w <= policy.withstands(k)), (policy, k, w)
    assert Mean().withstands(10) == 0


def test_a_trim_too_small_for_the_attack_is_said_in_one_line(caplog):
    assert robustness_warning(Trimmed(0.2), sampled=5, attackers=1) is None
    line = robustness_warning(Trimmed(0.2), sampled=5, attackers=2)
    assert line == ("train.aggregation = 'trimmed:0.2' removes at most 1 bad update(s) of the 5 "
                    "a round aggregates; 2 of the attack's 2 clients may be sampled together")
    with caplog.at_level("WARNING", logger="floral"):
        resolve_config({**_config(kind="sign-flip", fraction=0.2),
                        "train": {**_config()["train"], "clients_per_round": 0.5,
                                  "aggregation": "trimmed:0.2"}})
    assert any("removes at most 1 bad update(s) of the 5" in r.getMessage()
               for r in caplog.records)
