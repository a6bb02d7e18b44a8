import pytest
import yaml

from igpt_batch import config
from igpt_batch.cli import build_parser, config_from_args
from igpt_batch.errors import ConfigError


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


# ----------------------------------------------------------------------------- values refused before any work


@pytest.mark.parametrize("overrides, key", [
    ({"input.max_pixels": 0}, "input.max_pixels"),
    ({"input.max_pixels": "-5"}, "input.max_pixels"),
    ({"input.max_bytes": 0}, "input.max_bytes"),
    ({"generate.temperature": "inf"}, "generate.temperature"),
    ({"generate.temperature": "nan"}, "generate.temperature"),
    ({"input.read_timeout": "inf"}, "input.read_timeout"),
    ({"generate.seed": -1}, "generate.seed"),
    ({"generate.seed": 2**63}, "generate.seed"),
    ({"generate.seed": 2**63 - 10, "generate.num_samples": 11}, "generate.seed"),
    ({"run.torch_threads": -1}, "run.torch_threads"),
    ({"run.cpus_per_worker": "inf"}, "run.cpus_per_worker"),
    ({"input.max_pixels": "6.45e1"}, "input.max_pixels"),
    ({"input.max_pixels": "1e400x"}, "input.max_pixels"),
])
def test_values_that_can_only_fail_every_row_are_refused(overrides, key):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert str(e.value).startswith(key)


def test_documented_defaults_in_exponent_form_are_accepted(tmp_path):
    assert config.load(None, {"input.max_pixels": "64e6"}).input.max_pixels == 64_000_000
    assert config.load(None, {"generate.seed": 2**63 - 64, "generate.num_samples": 64}).generate.seed == 2**63 - 64
    f = tmp_path / "c.yaml"
    f.write_text("input:\n  max_pixels: 64e6\n  max_bytes: 1.0e+6\n")  # YAML reads the first as a string, the second as a float
    cfg = config.load(str(f))
    assert (cfg.input.max_pixels, cfg.input.max_bytes) == (64_000_000, 1_000_000)
    args = build_parser().parse_args(["extract", "--max-pixels", "64e6", "--manifest", "m.csv", "--output", "o"])
    assert config_from_args(args, "extract").input.max_pixels == 64_000_000


# ----------------------------------------------------------------------------- config files that cannot be read


@pytest.mark.parametrize("text, match", [
    ("model: {name: demo\n", "not valid YAML"),
    ("model: !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    ("- just\n- a list\n", "top level must be a mapping"),
])
def test_bad_config_files_are_named(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        config.load(str(f))
    assert str(f) in str(e.value)


def test_config_that_is_a_folder_or_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="is a folder") as e:
        config.load(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "c.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(tmp_path / "c.yaml"))


# ----------------------------------------------------------------------------- no secret in _job.json


def test_only_harmless_storage_options_are_kept():
    so = {"anon": False, "region_name": "eu-west-1", "key": "AKIAKEY", "secret": "s3cr3t-value", "token": "sessiontok",
          "connection_string": "AccountName=a;AccountKey=azurekey", "auth": ["user", "basicpass"], "passwd": "pw-value",
          "headers": {"Authorization": "Bearer bearer-value", "Cookie": "session=cookie-value"},
          "client_kwargs": {"endpoint_url": "http://minio:miniopass@minio.local:9000", "region_name": "us-east-1",
                            "aws_session_token": "nested-token"},
          "config_kwargs": {"retries": {"max_attempts": 3}, "s3": {"addressing_style": "path"}},
          "custom": {"deeply": [{"nested": "custom-value"}]}}
    d = config.load(None, {"storage_options": so}).to_dict()["storage_options"]
    assert d == {"anon": False, "region_name": "eu-west-1", "key": "***", "secret": "***", "token": "***",
                 "connection_string": "***", "auth": "***", "passwd": "***",
                 "headers": {"Authorization": "***", "Cookie": "***"},
                 "client_kwargs": {"endpoint_url": "http://minio.local:9000", "region_name": "us-east-1",
                                   "aws_session_token": "***"},
                 "config_kwargs": {"retries": {"max_attempts": 3}, "s3": {"addressing_style": "path"}},
                 "custom": {"deeply": "***"}}
    import json

    text = json.dumps(d)
    for secret in ("AKIAKEY", "s3cr3t", "sessiontok", "azurekey", "basicpass", "pw-value", "bearer-value", "cookie-value",
                   "miniopass", "nested-token", "custom-value"):
        assert secret not in text


def test_urls_in_the_saved_config_carry_no_credentials():
    cfg = config.load(None, {"input.manifest": "https://u:pw-value@h/m.csv?X-Amz-Signature=sig-value",
                             "output.path": "s3://bkt/out", "refresh.store": "https://h/s?token=tok-value"})
    d = cfg.to_dict()
    assert (d["input"]["manifest"], d["output"]["path"]) == ("https://h/m.csv?X-Amz-Signature=***", "s3://bkt/out")
    assert d["refresh"]["store"] == "https://h/s?token=***" and cfg.input.manifest.startswith("https://u:pw-value@")
