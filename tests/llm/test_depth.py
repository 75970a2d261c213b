"""`model.layers = N`: a pretrained language model cut to its first N decoder blocks computes
what the full model computes up to block N, then its final norm and head."""

from __future__ import annotations

import pytest
import torch

from floral.errors import ConfigError

pytest.importorskip("transformers")

from floral.llm import build_causal_lm  # noqa: E402
from floral.llm.depth import decoder_blocks, keep_first_blocks  # noqa: E402


def _final_norm_and_head(lm, name):
    if name == "tiny-llama":
        return lambda h: lm.lm_head(lm.model.norm(h))
    return lambda h: lm.lm_head(lm.transformer.ln_f(h))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_first_blocks_compute_the_full_models_first_blocks(name):
    torch.manual_seed(0)
    full = build_causal_lm(name, 40).eval()
    torch.manual_seed(0)
    cut = build_causal_lm(name, 40).eval()
    keep_first_blocks(cut.lm, 1)
    assert len(decoder_blocks(cut.lm)) == 1 and cut.lm.config.num_hidden_layers == 1
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = full.lm(input_ids=ids, output_hidden_states=True).hidden_states[1]
        expected = _final_norm_and_head(full.lm, name)(hidden)
        got = cut(ids)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, full(ids), atol=1e-3)  # the cut model is another model


def test_an_experiment_builds_its_model_at_the_asked_depth(tmp_path):
    from support.data import write_rda_folder

    from floral.experiment import build_setup, resolve_config

    def config(layers):
        return resolve_config({
            "task": {"dataset": "austen", "shift": "none", "num_clients": 2, "num_clusters": 2,
                     "tokenizer": "bytes", "block_size": 8, "samples_per_client": 4,
                     "data_dir": str(write_rda_folder(tmp_path / "rda"))},
            "model": {"name": "tiny-llama", "layers": layers},
            "method": {"name": "fedit", "rank": 2},
        })

    _, _, model = build_setup(config(1))
    assert len(decoder_blocks(model.lm)) == 1
    assert not any(".layers.1." in name for name in model.state_dict())
    with pytest.raises(ConfigError, match="model.layers: 3 asked, the model has 2 decoder blocks"):
        build_setup(config(3))


@pytest.mark.parametrize(("key", "value"), [("layers", 2), ("depths", [2, 1])])
def test_depth_is_for_language_models_only(key, value):
    from floral.experiment import build_setup, resolve_config

    config = resolve_config({"task": {"dataset": "synthetic-mlp", "shift": "none", "num_clients": 4,
                                      "samples_per_client": 4},
                             "model": {"name": "mlp", key: value}})
    with pytest.raises(ConfigError, match=f"model.{key}: only for language models"):
        build_setup(config)


def test_a_family_of_depths_holds_every_block_and_checks_its_depths():
    from floral.llm.depth import DepthBlocks, depth_family, make_depth_family

    torch.manual_seed(0)
    model = build_causal_lm("tiny-gpt2", 40)
    names = set(model.state_dict())
    make_depth_family(model.lm, [2, 1])
    assert isinstance(decoder_blocks(model.lm), DepthBlocks)
    added = set(model.state_dict()) - names
    assert added == {"lm.transformer.h.floral_depth", "lm.transformer.h.floral_depths"}
    assert depth_family(model) == ("lm.transformer.h.", [2, 1])
    assert "depth=-1, depths=[2, 1]" in repr(model)  # printable before a depth is set
    for depths, match in (([3], "model.depths: 3 asked, the model has 2"),
                          ([], "model.depths: give at least one depth")):
        with pytest.raises(ConfigError, match=match):
            make_depth_family(build_causal_lm("tiny-llama", 40).lm, depths)
    with pytest.raises(ConfigError, match="model.layers: the model is a family of depths"):
        keep_first_blocks(model.lm, 1)
