"""Released weights through a real, offline huggingface_hub cache (and torch.hub's cache), and the
save_pretrained / from_pretrained round trip. conftest.py points HF_HOME and TORCH_HOME at an empty
temporary folder and sets HF_HUB_OFFLINE=1; files are placed exactly where a download puts them."""

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import place_hub_file, place_torch_hub_file
from huggingface_hub import ModelHubMixin
from reference import original_baselines, original_v1, save_original
from safetensors.torch import save_file
from torch import nn

import metaformer
from metaformer import CheckpointError, MetaFormer, PretrainedError


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for every floating tensor (norm affines, scales, biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() > 1 and "random_matrix" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "random_matrix" in name:
                p.copy_(torch.softmax(2 * torch.randn(p.shape, generator=g), -1))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "layer_scale" in name:
                p.copy_(0.3 * (0.5 + torch.rand(p.shape, generator=g)))
            else:  # norm weights, res scales, StarReLU scales
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def _save_safetensors(model: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _timm_original_head_logits(t: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original release's head (sail-sg/poolformer's models/poolformer.py) with timm's tensors: GroupNorm(1, C, eps 1e-5) over the
    whole final map, then the mean over H and W, then the Linear. (timm pools first, then a LayerNorm.)"""
    feat = t.forward_features(x)
    normed = torch.nn.functional.group_norm(feat, 1, t.head.norm.weight, t.head.norm.bias, eps=1e-5)
    return t.head.fc(normed.mean((2, 3)))


def _assert_rel_close(got, expected, rel=1e-5):
    scale = expected.abs().max().item()
    assert scale > 1e-2
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


POOLFORMERS = ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"]


@pytest.mark.parametrize("name", POOLFORMERS)
def test_pretrained_timm_hub_file_gives_original_logits(name, tmp_path):
    t = randomize_(timm.create_model(name), seed=3)
    place_hub_file(f"timm/{name}.sail_in1k", "model.safetensors", _save_safetensors(t, tmp_path / "m.safetensors"))
    model = metaformer.create(name, pretrained=True).eval()
    assert model.pretrained_cfg["tag"] == "sail_in1k"
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = _timm_original_head_logits(t, x)
        _assert_rel_close(model(x), expected)
        # and it is not timm's own (pool-then-norm) output: the head order matters
        assert (t(x) - expected).abs().max() > 1e-3


@pytest.fixture(scope="module")
def s12_timm(tmp_path_factory):
    t = randomize_(timm.create_model("poolformer_s12"), seed=5)
    path = _save_safetensors(t, tmp_path_factory.mktemp("w") / "model.safetensors")
    place_hub_file("timm/poolformer_s12.sail_in1k", "model.safetensors", path)
    return t


def test_pretrained_new_num_classes_keeps_all_but_classifier(s12_timm):
    model = metaformer.create("poolformer_s12", pretrained=True, num_classes=10)
    ref = s12_timm.state_dict()
    ours = model.state_dict()
    assert ours["head.fc.weight"].shape == (10, 512)
    assert torch.count_nonzero(ours["head.fc.bias"]) == 0
    assert 0.01 < ours["head.fc.weight"].std() < 0.03  # truncated normal, std 0.02, as the release does
    for k, v in ref.items():
        if not k.startswith("head.fc."):
            torch.testing.assert_close(ours[k].reshape(v.shape), v, rtol=0, atol=0)


def test_pretrained_in_chans_adapts_stem(s12_timm):
    model = metaformer.create("poolformer_s12", pretrained=True, in_chans=1)
    w = s12_timm.state_dict()["stem.conv.weight"]
    torch.testing.assert_close(model.stem.conv.weight.detach(), w.sum(1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_pretrained_features_only_loads_backbone(s12_timm, caplog):
    with caplog.at_level(logging.INFO, logger="metaformer"):
        model = metaformer.create("poolformer_s12", pretrained=True, features_only=True).eval()
    assert "start fresh" in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
        expected_last = s12_timm.forward_features(x)
    # fresh feature norms are GroupNorm(1) with unit weight and zero bias
    torch.testing.assert_close(feats[-1], torch.nn.functional.group_norm(expected_last, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["metaformer_ppaa_s12_224", "metaformer_pppf_s12_224"])
def test_pretrained_release_file_through_torch_hub_cache(name, tmp_path):
    ref = original_v1.randomize_(original_v1.build(name), seed=7).eval()
    save_original(ref, tmp_path / "w.pth.tar")
    variant = metaformer.get_variant(name)
    place_torch_hub_file(variant.source().url, tmp_path / "w.pth.tar")
    model = metaformer.create(name, pretrained=True).eval()
    assert model.pretrained_cfg["crop_pct"] == variant.crop_pct
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _assert_rel_close(model(x), ref(x))


@pytest.mark.parametrize("name", ["identityformer_s12", "randformer_s12"])
def test_pretrained_sail_dl_release_file(name, tmp_path):
    ref = original_baselines.randomize_(original_baselines.build(name), seed=11).eval()
    save_original(ref, tmp_path / "w.pth")
    family = name.split("_")[0]
    place_hub_file("sail/dl", f"{family}/{name}.pth", tmp_path / "w.pth")
    model = metaformer.create(name, pretrained=True).eval()
    assert model.pretrained_cfg["source"] == f"hf-hub:sail/dl/{family}/{name}.pth"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _assert_rel_close(model(x), ref(x))
    if name.startswith("randformer"):  # the released matrix is loaded, not re-drawn
        torch.testing.assert_close(model.stages[2].blocks[0].token_mixer.random_matrix,
                                   ref.state_dict()["stages.2.0.token_mixer.random_matrix"], rtol=0, atol=0)


def test_pretrained_timm_baseline_in22k_tag(tmp_path):
    t = randomize_(timm.create_model("caformer_s18", num_classes=21841), seed=13)
    t.head.fc.norm.eps = 1e-5  # the original release's MLP-head LayerNorm eps (timm uses 1e-6)
    place_hub_file("timm/caformer_s18.sail_in22k", "model.safetensors", _save_safetensors(t, tmp_path / "m.st"))
    model = metaformer.create("caformer_s18.sail_in22k", pretrained=True).eval()
    assert model.num_classes == 21841
    assert model.head.fc.norm.eps == 1e-5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_rel_close(model(x), t(x))


def test_tags_are_listed_and_checked():
    tags = metaformer.list_models("caformer_b36*", pretrained=True)
    assert "caformer_b36.sail_in22k_ft_in1k_384" in tags and "caformer_b36.release_in22k" in tags
    with pytest.raises(ValueError, match="no pretrained tag 'sail_in2k'.*sail_in22k"):
        metaformer.create("caformer_s18.sail_in2k")
    cfg = metaformer.create("convformer_s18.sail_in1k_384").pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0
    # the original code's caformer_m36_in21k factory looked up "caformer_m364_in21k" and built 1000 classes
    src = metaformer.get_variant("caformer_m36").source("release_in22k")
    assert (src.hf_hub_id, src.hf_filename, src.num_classes) == ("sail/dl", "caformer/caformer_m36_in21k.pth", 21841)
    assert metaformer.create("caformer_m36.release_in22k").num_classes == 21841


# ------------------------------------------------------------------------------------- failures
def test_offline_and_not_cached_names_model_source_and_fix():
    with pytest.raises(PretrainedError) as e:
        metaformer.create("convformer_m36", pretrained=True)
    msg = str(e.value)
    assert "convformer_m36.sail_in1k" in msg and "hf-hub:timm/convformer_m36.sail_in1k" in msg
    assert "checkpoint=PATH" in msg
    with pytest.raises(PretrainedError, match=r"poolformer_s36\.release_in1k.*not in torch.hub's cache"):
        metaformer.create("poolformer_s36.release_in1k", pretrained=True)


def test_truncated_file_is_a_clear_error(tmp_path):
    t = timm.create_model("poolformerv2_s12")
    data = _save_safetensors(t, tmp_path / "full.st").read_bytes()
    (tmp_path / "cut.st").write_bytes(data[: len(data) // 2])
    place_hub_file("timm/poolformerv2_s12.sail_in1k", "model.safetensors", tmp_path / "cut.st")
    with pytest.raises(PretrainedError, match="truncated or corrupt"):
        metaformer.create("poolformerv2_s12", pretrained=True)


def test_weights_of_another_architecture_name_the_tensors(tmp_path):
    t = timm.create_model("poolformerv2_s12")
    place_hub_file("timm/poolformerv2_s24.sail_in1k", "model.safetensors", _save_safetensors(t, tmp_path / "m.st"))
    with pytest.raises(CheckpointError, match=r"poolformerv2_s24\.sail_in1k.*missing \d+: stages\."):
        metaformer.create("poolformerv2_s24", pretrained=True)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TORCH_HOME']}/pwned",))


def test_no_pickled_code_runs(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"stem.conv.weight": _Evil()}, f, protocol=2)  # torch.save's protocol
    place_hub_file("sail/dl", "identityformer/identityformer_s24.pth", path)
    with pytest.raises(PretrainedError, match=r"pickled Python object \((posix|os|nt)\.system\)"):
        metaformer.create("identityformer_s24", pretrained=True)
    assert not (Path(os.environ["TORCH_HOME"]) / "pwned").exists()


_FAKE_HUB = textwrap.dedent("""
    import http.server, os, sys, threading
    class H(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            code = "RepoNotFound" if "/nobody/" in self.path or "/timm/poolformer_s12" in self.path else "EntryNotFound"
            self.send_response(404 if code == "EntryNotFound" else 401)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET = _answer
        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ["HF_HUB_ETAG_TIMEOUT"] = "5"
    os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = "5"
    import metaformer
    for call in (lambda: metaformer.create("hf-hub:nobody/missing-repo"),
                 lambda: metaformer.create("poolformer_s12", pretrained=True),
                 lambda: metaformer.create("caformer_s18.release_in1k", pretrained=True)):
        try:
            call()
            print("NO ERROR")
        except metaformer.PretrainedError as e:
            print("ERR", e)
    server.shutdown()
""")


def test_missing_repo_and_missing_file_against_a_local_hub_server(tmp_path):
    """A loopback HTTP server answers like the Hub does for a missing repo or file."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", _FAKE_HUB], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    assert "does not exist or is private" in lines[0] and "nobody/missing-repo" in lines[0]
    assert "poolformer_s12.sail_in1k" in lines[1] and "does not exist" in lines[1]
    assert "caformer_s18.release_in1k" in lines[2] and "has no file 'caformer/caformer_s18.pth'" in lines[2]


# ---------------------------------------------------------------------------------- round trips
def test_save_pretrained_round_trip_of_a_hybrid_ablation(tmp_path):
    model = metaformer.create("metaformer_pppa_s12_224", pool_size=5, act_layer="starrelu", num_classes=7,
                              drop_path_rate=0.1, layer_scale_init_value=0.5, mlp_ratio=3)
    randomize_(model, seed=17)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"]["act_layer"] == {"name": "starrelu", "kwargs": {}}
    assert config["pretrained_cfg"]["architecture"] == "metaformer_pppa_s12_224"
    loaded = MetaFormer.from_pretrained(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.pretrained_cfg["input_size"] == (3, 224, 224)
    assert loaded.stages[0].blocks[0].token_mixer.pool_size == 5

    # the same two files in the Hub cache serve create("hf-hub:...")
    for f in ("config.json", "model.safetensors"):
        place_hub_file("me/pppa-ablation", f, tmp_path / "saved" / f)
    from_hub = metaformer.create("hf-hub:me/pppa-ablation").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_hub(x), model(x), rtol=0, atol=0)
    # uploading is huggingface_hub's own code, which uploads what save_pretrained writes
    assert MetaFormer.push_to_hub is ModelHubMixin.push_to_hub


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path):
    """push_to_hub against a loopback server answering the Hub's upload API; the uploaded files equal
    save_pretrained's and rebuild the model."""
    script = Path(__file__).with_name("fake_hub_push.py")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "uploaded" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes(), name
    model = MetaFormer.from_pretrained(tmp_path / "uploaded").eval()
    assert model.num_classes == 3 and model.stages[0].blocks[0].token_mixer.pool_size == 5
    assert isinstance(model.stages[0].blocks[0].mlp.act, nn.SiLU)


class _Shift(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x):
        return self.gate * torch.roll(x, 1, dims=-1) - x


def test_custom_mixer_saves_weights_and_says_config_cannot_name_it(tmp_path):
    model = metaformer.create("poolformer_s12", token_mixer=_Shift)
    with pytest.warns(UserWarning, match="_Shift is not a built-in metaformer component"):
        model.save_pretrained(tmp_path / "custom")
    assert (tmp_path / "custom" / "model.safetensors").is_file()
    with pytest.raises(PretrainedError, match="cannot be rebuilt.*_Shift.*load_checkpoint"):
        MetaFormer.from_pretrained(tmp_path / "custom")
    rebuilt = metaformer.create("poolformer_s12", token_mixer=_Shift)
    metaformer.load_checkpoint(rebuilt, tmp_path / "custom" / "model.safetensors")
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_pretrained_of_a_foreign_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PretrainedError, match="not written by metaformer"):
        MetaFormer.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PretrainedError, match="no config.json"):
        MetaFormer.from_pretrained(empty)
