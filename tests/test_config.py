"""Configuration: YAML + overrides, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from avsr.config import ConfigError, from_dict, load_config, save_config, to_dict


def test_defaults_are_the_paper_base_model():
    cfg = load_config()
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.num_heads, cfg.model.ffn_dim) == (12, 256, 4, 2048)
    assert cfg.model.decoder_layers == 6 and cfg.model.ctc_weight == pytest.approx(0.1)


def test_yaml_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 128\n  num_layers: 2\ntrain:\n  lr: 0.01\n")
    (tmp_path / "exp.yaml").write_text("_base_: [base.yaml]\nmodel:\n  num_layers: 4\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.lr=5e-4", "corruption.snr_db=[0,5]"])
    assert cfg.model.d_model == 128  # from the base file
    assert cfg.model.num_layers == 4  # the child file wins
    assert cfg.train.lr == pytest.approx(5e-4)  # the override wins
    assert cfg.corruption.snr_db == [0.0, 5.0]


def test_several_files_merge_in_order_as_a_recipe_and_an_overlay():
    # make adapt's use: a mode's recipe, then the fine-tuning overlay, then overrides
    grid = Path(__file__).resolve().parents[1] / "configs" / "grid"
    cfg = load_config([grid / "video.yaml", grid / "adapt_frozen_frontends.yaml"], ["train.lr=1e-4"])
    assert cfg.model.mode == "video" and cfg.model.ctc_weight == pytest.approx(0.1)  # the recipe's
    assert cfg.data.train_split == "adapt" and cfg.train.max_steps == 100 and cfg.train.freeze == ["frontends"]
    assert cfg.train.init_from.endswith("grid_audio/best.pt")  # the recipe's, until the overlay's caller sets it
    assert cfg.train.lr == pytest.approx(1e-4)
    scratch = load_config([grid / "video.yaml", grid / "adapt_scratch.yaml"])
    assert scratch.train.init_from == "" and scratch.train.max_steps == cfg.train.max_steps


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.d_modle=128", "Did you mean 'd_model'"),
        ("modle.d_model=128", "Valid keys in the top level"),
        ("model.d_model=abc", "model.d_model"),
        ("model.mode=lips", "model.mode must be one of"),
        ("train.lr", "key.sub=value"),
    ],
)
def test_bad_overrides_are_clear_errors(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text("data:\n  max_frame: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert "data.max_frame" in str(err.value) and "max_frames" in str(err.value)


def test_yaml_is_parsed_safely(tmp_path):
    (tmp_path / "evil.yaml").write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")


def test_round_trip_through_dict_and_file(tmp_path):
    cfg = load_config(None, ["seed=7", "model.mode=video"])
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "cfg.yaml")
    assert load_config(tmp_path / "cfg.yaml") == cfg
