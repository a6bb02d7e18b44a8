"""Tests for igpt_batch.model.checkpoint: complete checkpoints, clear refusals, a fingerprint of everything that matters."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from igpt_batch.model import checkpoint


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint (3 layers, width 32, 4 heads, 16 colours), free to break."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def _edit_weights(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_json(path, name, edit):
    f = path / name
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))


def test_complete_checkpoints_are_accepted(ckpt):
    info = checkpoint.read_info(str(ckpt))
    assert (info.n_px, info.n_layer, info.n_embd, info.n_head, info.vocab_size) == (8, 3, 32, 4, 17)
    assert checkpoint.read_info("demo").n_layer == 4


@pytest.mark.parametrize("drop, named", [
    (lambda k: k.startswith("transformer.h.0.mlp."), "transformer.h.0.mlp.c_fc.bias"),
    (lambda k: k == "transformer.ln_f.weight", "transformer.ln_f.weight"),
    (lambda k: k == "lm_head.weight", "lm_head.weight"),
])
def test_missing_tensors_are_refused_by_name(ckpt, drop, named):
    _edit_weights(ckpt, lambda t: [t.pop(k) for k in list(t) if drop(k)])
    with pytest.raises(ValueError, match="missing") as e:
        checkpoint.read_info(str(ckpt))
    assert named in str(e.value) and str(ckpt) in str(e.value)


def test_extra_tensors_are_refused_by_name(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"transformer.h.3.ln_1.weight": np.ones(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected .*transformer\.h\.3\.ln_1\.weight"):
        checkpoint.read_info(str(ckpt))


def test_legacy_attention_buffers_are_allowed(ckpt):
    # transformers 4.x saved the causal mask buffers; today's transformers ignores them on load
    _edit_weights(ckpt, lambda t: t.update({f"transformer.h.{i}.attn.{b}": np.ones((1, 1, 64, 64), np.float32)
                                            for i in range(3) for b in ("bias", "masked_bias")}))
    assert checkpoint.read_info(str(ckpt)).n_layer == 3


def test_shapes_that_do_not_match_the_config_are_refused(ckpt):
    _edit_json(ckpt, "config.json", lambda d: d.update(n_embd=48))
    with pytest.raises(ValueError, match=r"shape.*transformer\.wte\.weight.*\[17, 32\].*\[17, 48\]"):
        checkpoint.read_info(str(ckpt))


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]), "corrupt safetensors"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"), "corrupt safetensors"),
    (lambda p: (p / "preprocessor_config.json").write_text("{not json"), r"preprocessor_config\.json.*not valid JSON"),
    (lambda p: _edit_json(p, "preprocessor_config.json", lambda d: d.pop("clusters")), r"preprocessor_config\.json.*clusters"),
    (lambda p: _edit_json(p, "preprocessor_config.json", lambda d: d.update(clusters="red")), r"preprocessor_config\.json"),
    (lambda p: (p / "config.json").write_text("[1, 2"), r"config\.json.*not valid JSON"),
    (lambda p: _edit_json(p, "config.json", lambda d: d.pop("n_head")), r"config\.json.*n_head"),
])
def test_broken_files_give_a_clear_value_error(ckpt, damage, match):
    damage(ckpt)
    with pytest.raises(ValueError, match=match):
        checkpoint.read_info(str(ckpt))


def test_fingerprint_covers_the_model_config_and_the_clusters(ckpt):
    base = checkpoint.read_info(str(ckpt)).weights_fingerprint

    def fingerprint_after(name, edit):
        _edit_json(ckpt, name, edit)
        return checkpoint.read_info(str(ckpt)).weights_fingerprint

    assert fingerprint_after("config.json", lambda d: d.update(transformers_version="0.0.1", _name_or_path="x")) == base
    assert fingerprint_after("config.json", lambda d: d.update(activation_function="gelu_new")) != base
    base = checkpoint.read_info(str(ckpt)).weights_fingerprint
    assert fingerprint_after("config.json", lambda d: d.update(layer_norm_epsilon=1e-3)) != base
    base = checkpoint.read_info(str(ckpt)).weights_fingerprint
    assert fingerprint_after("config.json", lambda d: d.update(scale_attn_by_inverse_layer_idx=True)) != base
    base = checkpoint.read_info(str(ckpt)).weights_fingerprint
    clusters = np.asarray(json.loads((ckpt / "preprocessor_config.json").read_text())["clusters"])
    clusters[0, 0] = -clusters[0, 0]
    assert fingerprint_after("preprocessor_config.json", lambda d: d.update(clusters=clusters.tolist())) != base


# ---- the model on the node that runs it --------------------------------------------------------------------------

def upload(src, url: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for f in sorted(src.iterdir()):
        fs.pipe_file(f"{root}/{f.name}", f.read_bytes())


def test_each_kind_of_name_becomes_a_reference_every_node_can_resolve(ckpt, tmp_path, monkeypatch):
    from igpt_batch.model.resolve import ModelRef

    monkeypatch.setenv("IGPT_MODEL_CACHE", str(tmp_path / "cache"))
    assert checkpoint.read_info("demo").ref == ModelRef("demo", "demo")
    info = checkpoint.read_info(str(ckpt))
    assert info.ref == ModelRef("folder", str(ckpt)) and checkpoint.open_on_node(info) == str(ckpt)
    upload(ckpt, "memory://models/tiny/")
    remote = checkpoint.read_info("memory://models/tiny/")
    assert remote.ref == ModelRef("url", "memory://models/tiny") and remote.weights_fingerprint == info.weights_fingerprint
    assert remote.path == str(tmp_path / "cache" / info.weights_fingerprint)  # the driver's copy, named by fingerprint
    with pytest.raises(ValueError, match="neither a local checkpoint folder, an object-store URL"):
        checkpoint.read_info(str(tmp_path / "nowhere"))


def test_a_node_downloads_once_atomically_and_refuses_a_different_copy(ckpt, tmp_path, monkeypatch):
    import threading

    from igpt_batch.errors import WorkerStartError
    from igpt_batch.model import resolve

    monkeypatch.setenv("IGPT_MODEL_CACHE", str(tmp_path / "node"))
    upload(ckpt, "memory://models/a/")
    info = checkpoint.read_info("memory://models/a")
    monkeypatch.setenv("IGPT_MODEL_CACHE", str(tmp_path / "other-node"))  # a worker node with an empty cache
    downloads, real = [], resolve._download
    monkeypatch.setattr(resolve, "_download", lambda *a: downloads.append(1) or real(*a))
    got: list = []
    actors = [threading.Thread(target=lambda: got.append(checkpoint.open_on_node(info))) for _ in range(3)]
    for t in actors:
        t.start()
    for t in actors:
        t.join()
    assert got == [str(tmp_path / "other-node" / info.weights_fingerprint)] * 3 and downloads == [1]
    assert sorted(p.name for p in (tmp_path / "other-node").iterdir() if not p.name.endswith(".lock")) == [
        info.weights_fingerprint]  # no half-written folder left behind
    # the store now holds other weights: this node's download does not match the driver's, so it refuses
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-6}))
    upload(ckpt, "memory://models/a/")
    monkeypatch.setenv("IGPT_MODEL_CACHE", str(tmp_path / "third-node"))
    with pytest.raises(WorkerStartError, match=f"has weights fingerprint .* the job's is {info.weights_fingerprint}"):
        checkpoint.open_on_node(info)
    # a folder that is not on this node: the message names it, the node and the fix
    gone = dataclasses.replace(info, ref=resolve.ModelRef("folder", str(tmp_path / "driver-only")))
    with pytest.raises(WorkerStartError, match=r"driver-only does not exist on node .*shared.*hub id.*s3://"):
        checkpoint.open_on_node(gone)
