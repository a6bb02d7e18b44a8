import pytest
import yaml

from igpt_batch import config
from igpt_batch.cli import build_parser, config_from_args
from igpt_batch.config import ConfigError


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"name": "x", "dtype": "bf16"}, "extract": {"layers": [3, 1]}, "run": {"workers": 4}}))
    cfg = config.load(str(f), {"run.workers": "2", "generate.top_k": 40})
    assert (cfg.model.name, cfg.model.dtype, cfg.extract.layers, cfg.run.workers, cfg.generate.top_k) == ("x", "bf16", [3, 1], 2, 40)
    assert cfg.run.shard_size == config.RunConfig().shard_size  # untouched default


@pytest.mark.parametrize("data, key", [
    ({"extract": {"layres": [1]}}, "extract.layres"),
    ({"modle": {"name": "x"}}, "modle"),
    ({"run": {"workers": "many"}}, "run.workers"),
    ({"generate": {"temperature": -1}}, "generate.temperature"),
    ({"generate": {"top_p": 0}}, "generate.top_p"),
    ({"model": {"dtype": "fp8"}}, "model.dtype"),
    ({"run": {"executor": "spark"}}, "run.executor"),
    ({"extract": {"layers": ["a"]}}, "extract.layers[0]"),
    ({"output": {"overwrite": "maybe"}}, "output.overwrite"),
    ({"run": "fast"}, "run"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, data, key):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert key in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("/nonexistent/x.yaml")


def test_secrets_are_redacted():
    cfg = config.load(None, {"storage_options": {"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://h"}}})
    d = cfg.to_dict()
    assert d["storage_options"] == {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://h"}}
    assert cfg.storage_options["secret"] == "s3cr3t"  # the live config keeps it


def test_cli_flags_map_to_config_and_override_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"generate": {"num_samples": 5, "temperature": 0.5}}))
    args = build_parser().parse_args(["generate", "--config", str(f), "--num-samples", "7", "--top-p", "0.9",
                                      "--batch-size", "3", "--output", "o", "--workers", "2"])
    cfg = config_from_args(args, "generate")
    assert (cfg.generate.num_samples, cfg.generate.temperature, cfg.generate.top_p, cfg.generate.batch_size) == (7, 0.5, 0.9, 3)
    assert (cfg.output.path, cfg.run.workers) == ("o", 2)
    args = build_parser().parse_args(["extract", "--layer", "2", "--layer", "1", "--batch-size", "9"])
    cfg = config_from_args(args, "extract")
    assert cfg.extract.layers == [2, 1] and cfg.extract.batch_size == 9


def test_shipped_configs_are_valid():
    from pathlib import Path

    folder = Path(__file__).parent.parent / "configs"
    # each shipped file, with a setting that shows it loaded as itself (not just the defaults)
    expected = {
        "demo.yaml": lambda c: (c.model.name, c.extract.layers, c.output.preview) == ("demo", [2, 4], 8),
        "imagegpt-medium-extract.yaml": lambda c: (c.model.name, c.extract.layers, c.input.draft)
        == ("openai/imagegpt-medium", [18], True),
        "imagegpt-small-generate.yaml": lambda c: (c.model.name, c.generate.num_samples) == ("openai/imagegpt-small", 10000),
        "nightly-refresh.yaml": lambda c: (c.refresh.store, c.input.manifest)
        == ("s3://my-bucket/igpt/embedding-store", "s3://my-bucket/catalog/images-manifest.parquet"),
    }
    assert sorted(f.name for f in folder.glob("*.yaml")) == sorted(expected)
    for name, check in expected.items():
        cfg = config.load(str(folder / name))
        assert check(cfg), f"{name} did not load its own settings: {cfg.to_dict()}"
