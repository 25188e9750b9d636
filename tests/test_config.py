import os

import pytest

from tf_effitrain.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)

from harness import REPO


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.runtime.engine == "keras3"
    assert cfg.data.batching == "bucket"


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_shipped_configs_load(name):
    cfg = load_config(os.path.join(REPO, "configs", name))
    assert cfg.training.epochs >= 1


def test_overrides_parse_yaml_scalars_and_apply_after_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 3\nmodel:\n  norm: batch\n")
    cfg = load_config(str(path), ["training.epochs=7", "model.embedding_rank=16",
                                  "model.share_layers=true", "data.classes=[a, b]"])
    assert cfg.training.epochs == 7
    assert cfg.model.norm == "batch"
    assert cfg.model.embedding_rank == 16
    assert cfg.model.share_layers is True
    assert cfg.data.classes == ["a", "b"]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_int_widens_to_float():
    cfg = config_from_dict({"optimizer": {"learning_rate": 1}})
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"data": {"batch_sise": 8}}, "Unknown config key `data.batch_sise`. Did you mean `data.batch_size`?"),
        ({"trainig": {}}, "Unknown config key `trainig`. Did you mean `training`?"),
        ({"training": {"epochs": "3x"}}, "`training.epochs` must be of type int. Received: training.epochs='3x'"),
        ({"training": {"epochs": 2.5}}, "`training.epochs` must be of type int"),
        ({"model": {"share_layers": "yes"}}, "`model.share_layers` must be of type bool"),
        ({"model": {"norm": "rmsnorm"}}, "`model.norm` must be one of ['layer', 'batch', 'rms']. Received: model.norm='rmsnorm'. Did you mean `rms`?"),
        ({"training": {"epochs": 0}}, "`training.epochs` must be >= 1. Received: training.epochs=0"),
        ({"model": {"d_model": 30, "num_heads": 4}}, "divisible by `model.num_heads`"),
        ({"model": {"embedding_rank": 128, "d_model": 128}}, "`model.embedding_rank` must be smaller"),
        ({"data": {"source": "tfds"}}, "`data.tfds_name` must be set"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "must be < 1"),
        ({"data": {"bucket_boundaries": [32, 16]}}, "strictly increasing"),
        ({"data": {"classes": "a"}}, "`data.classes` must be a list of str"),
        ({"data": 3}, "`data` must be a mapping"),
        ({"model": {"kind": "bert_backbone"}, "runtime": {"engine": "tf_keras"}}, "needs `runtime.engine: keras3`"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert message in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="must look like `section.key=value`"):
        load_config(None, ["training.epochs"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.attention=local", "model.window=8", "data.classes=[x, y]"])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg


def test_a_config_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- runtime\n- data\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^`data` must be a mapping"):
        config_from_dict({"data": 3})
