"""Careless and hostile use of the library (not the command line): saves that survive kills and races,
files that ask for too much, weights and arguments that would be silently wrong, and errors that say
what to do. One test per case of the robustness report; each failed on metaformer 0.1.0."""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from safetensors.torch import save_file
from torch import nn

import metaformer
from metaformer import CheckpointError, MetaFormer, PretrainedError


def _tiny(seed: int = 0) -> MetaFormer:
    torch.manual_seed(seed)
    return MetaFormer(depths=(1, 1), dims=(8, 16), num_classes=3)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ data lost
def _save_in_subprocess(folder: Path, seed: int, kill_at: str) -> int:
    """Saves a tiny model (seed) into folder in a fresh process that SIGKILLs itself at one moment."""
    code = textwrap.dedent(f"""
        import os, signal, torch, safetensors.torch as st
        import metaformer
        from metaformer import MetaFormer
        torch.manual_seed({seed})
        model = MetaFormer(depths=(1, 1), dims=(8, 16), num_classes=3)
        kill_at = {kill_at!r}
        real_save, real_replace = st.save_file, os.replace
        def save_file(tensors, path, metadata=None):
            if kill_at == "weights":  # half a file, then death
                with open(path, "wb") as f:
                    f.write(b"x" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(tensors, path, metadata=metadata)
        calls = []
        def replace(src, dst):
            real_replace(src, dst)
            calls.append(dst)
            if kill_at == "between" and str(dst).endswith("config.json"):
                os.kill(os.getpid(), signal.SIGKILL)
        st.save_file, os.replace = save_file, replace
        model.save_pretrained({str(folder)!r})
    """)
    return subprocess.run([sys.executable, "-c", code], env=subprocess_env(), timeout=300).returncode


@pytest.mark.parametrize("kill_at", ["weights", "between"])
def test_save_over_a_save_is_all_or_nothing_when_killed(tmp_path, kill_at):
    """Case 1: a kill during a save over an existing save leaves a loadable folder (old or new model)."""
    old, new = _tiny(seed=1), _tiny(seed=2)
    old.save_pretrained(tmp_path)
    assert _save_in_subprocess(tmp_path, 2, kill_at) == -signal.SIGKILL
    loaded = MetaFormer.from_pretrained(tmp_path)
    assert _same(loaded, old if kill_at == "weights" else new)
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # the killed writer's file is still there
    new.save_pretrained(tmp_path)  # the next save cleans up
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert _same(MetaFormer.from_pretrained(tmp_path), new)


def test_config_never_pairs_with_another_saves_weights(tmp_path):
    """Case 4: a config.json beside another save's weights is refused, not loaded as a mix."""
    a, b = tmp_path / "a", tmp_path / "b"
    _tiny(seed=1).save_pretrained(a)
    _tiny(seed=2).save_pretrained(b)
    (b / "config.json").write_bytes((a / "config.json").read_bytes())
    with pytest.raises(PretrainedError, match="not the file config.json was saved with"):
        MetaFormer.from_pretrained(b)


def test_concurrent_saves_into_one_folder_take_turns(tmp_path):
    """Case 4: two writers saving into one folder at once leave one model's config with its own weights."""
    models = [_tiny(seed=s) for s in (1, 2)]
    errors = []

    def save(model):
        try:
            for _ in range(6):
                model.save_pretrained(tmp_path)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    loaded = MetaFormer.from_pretrained(tmp_path)
    assert _same(loaded, models[0]) or _same(loaded, models[1])


def test_saved_files_follow_the_umask(tmp_path):
    """Case 14: save_pretrained's files get the permissions of any new file, not mkstemp's 0600."""
    mask = os.umask(0o022)
    try:
        _tiny().save_pretrained(tmp_path)
    finally:
        os.umask(mask)
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_inference_copy_refuses_to_save(tmp_path):
    """Case 12: an optimize_for_inference copy cannot be saved as something that will not reload."""
    fast = metaformer.optimize_for_inference(_tiny().eval())
    with pytest.raises(TypeError, match="save the original model"):
        fast.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------------------------ silently wrong
def test_eval_mode_finetuning_of_some_parameters_gets_gradients():
    """Case 6: eval-mode CPU fine-tuning of only the MLPs: the oneDNN inference path must not run."""
    model = metaformer.create("poolformer_s12", num_classes=4).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad", [torch.int8, torch.bool, torch.complex64, "nan", "inf"])
def test_weights_of_another_dtype_or_non_finite_are_refused(tmp_path, bad):
    """Case 7: int8 / bool / complex tensors and NaN / inf weights are errors naming the tensor."""
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "stages.0.blocks.0.mlp.fc1.weight"
    if isinstance(bad, torch.dtype):
        state[key] = torch.ones_like(state[key]).to(bad)
    else:
        state[key][0, 0] = float(bad)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        metaformer.load_checkpoint(_tiny(), str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("out_indices", [(2, 0), (1, 1), (0, 4), (), ("1",)])
def test_out_indices_must_be_increasing_stage_indices(out_indices):
    """Case 8: unsorted or repeated out_indices are refused (the maps come out in stage order)."""
    with pytest.raises((ValueError, TypeError), match="out_indices"):
        metaformer.create("poolformer_s12", features_only=True, out_indices=out_indices)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(drop_path_rate=1.0), ValueError, "drop_path_rate"),
    (dict(drop_path_rate=-0.1), ValueError, "drop_path_rate"),
    (dict(token_mixer="relu"), ValueError, "'relu' is an activation, not a token mixer"),
    (dict(norm_layer="pooling"), ValueError, "'pooling' is a token mixer, not a norm"),
    (dict(token_mixer=metaformer.Pooling()), TypeError, "pass the class Pooling"),
    (dict(num_classes="10"), TypeError, "num_classes must be an int"),
    (dict(pool_size="3"), TypeError, "pool_size must be an int"),
])
def test_arguments_of_the_wrong_kind_are_refused(kwargs, error, match):
    """Cases 11 and 14: out-of-range rates, components of the wrong kind, instances, string numbers."""
    with pytest.raises(error, match=match):
        metaformer.create("poolformer_s12", **kwargs)


class _Broadcasting(nn.Module):
    def __init__(self, dim):
        super().__init__()

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


def test_a_mixer_of_the_wrong_output_shape_is_an_error():
    """Case 11: a mixer returning (B, C, 1, 1) is not silently broadcast into the residual."""
    model = metaformer.create("poolformer_s12", token_mixer=_Broadcasting)
    with pytest.raises(ValueError, match=r"_Broadcasting returned shape \(2, 64, 1, 1\)"):
        model(torch.randn(2, 3, 64, 64))


def test_bad_backend_variable_is_an_error_for_every_family(monkeypatch):
    """Case 11: METAFORMER_BACKEND=garbage is an error for CAFormer too, not only PoolFormer."""
    from metaformer import kernels

    monkeypatch.setenv("METAFORMER_BACKEND", "garbage")
    monkeypatch.setattr(kernels, "_backend", None)
    model = metaformer.create("caformer_s18")
    with pytest.raises(ValueError, match="METAFORMER_BACKEND"):
        model(torch.randn(1, 3, 64, 64))


def test_float64_input_to_a_float32_model_says_what_to_do():
    """Case 14: a dtype mismatch is named, with the conversion to make."""
    with pytest.raises(TypeError, match=r"torch.float64 but the model's weights are torch.float32"):
        _tiny()(torch.randn(1, 3, 32, 32, dtype=torch.float64))


# ------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize(("field", "value"), [
    ("depths", [100000, 1]), ("dims", [1000000, 16]), ("num_classes", 10**9), ("mlp_ratios", 1e5),
    ("dims", 1e6), ("num_classes", 1e9)])
def test_a_config_asking_for_a_huge_model_fails_before_allocating(tmp_path, field, value):
    """Case 13: config.json numbers are checked before anything is built (fast, no memory)."""
    MetaFormer(depths=(1, 1), dims=(64, 512), num_classes=3).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(PretrainedError, match=r"METAFORMER_MAX_(PARAMETERS|BLOCKS)|must be|expected one value"):
        MetaFormer.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------ unclear errors
def test_checkpoint_paths_that_are_not_files(tmp_path):
    """Case 14: a folder, a symlink loop and a dangling link are named as such, not 'file not found'."""
    loop = tmp_path / "loop.pth"
    os.symlink(loop, loop)
    os.symlink(tmp_path / "nowhere.pth", tmp_path / "dangling.pth")
    for path, match in [(tmp_path, "is a folder"), (loop, "symbolic link"), (tmp_path / "dangling.pth", "symbolic link")]:
        with pytest.raises(CheckpointError, match=match):
            metaformer.load_checkpoint(_tiny(), str(path))


def test_safetensors_without_its_suffix_and_pickled_modules(tmp_path):
    """Case 14: a safetensors file named .pth loads; a pickled module is refused without advice to unpickle."""
    model = _tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.pth"))
    other = _tiny(seed=5)
    metaformer.load_checkpoint(other, str(tmp_path / "w.pth"))
    assert _same(other, model)
    torch.save(model, tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match=r"pickled Python object \(metaformer\.model\.MetaFormer\)") as e:
        metaformer.load_checkpoint(_tiny(), str(tmp_path / "module.pth"))
    assert "weights_only=False" not in str(e.value)


def test_hub_ids_that_are_not_ids():
    """Case 14: hf-hub:/nonexistent is a clear error, not huggingface_hub's validation traceback."""
    with pytest.raises(PretrainedError, match="neither an existing folder nor a Hub repo id"):
        metaformer.create("hf-hub:/nonexistent")


@pytest.mark.parametrize("patch", [
    {"architecture": {"depths": "abc"}}, {"architecture": [1, 2]}, {"pretrained_cfg": "x"},
    {"architecture": {"token_mixers": {"name": "pooling", "kwargs": [1]}}}])
def test_malformed_config_fields_are_pretrained_errors(tmp_path, patch):
    """Case 14: malformed config.json fields give a PretrainedError naming the file, not raw exceptions."""
    _tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="config.json"):
        MetaFormer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ 16.6 / 16.10 saved folders
def test_create_accepts_a_saved_folder_and_a_registered_name_wins(tmp_path, monkeypatch):
    model = _tiny(seed=3).eval()
    model.save_pretrained(tmp_path / "saved")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(metaformer.create(str(tmp_path / "saved")).eval()(x), model(x), rtol=0, atol=0)
    # a folder named like a registered model: the name wins, "./NAME" is the folder
    model.save_pretrained(tmp_path / "poolformer_s12")
    monkeypatch.chdir(tmp_path)
    assert metaformer.create("poolformer_s12").num_classes == 1000
    with torch.no_grad():
        torch.testing.assert_close(metaformer.create("./poolformer_s12").eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown model"):
        metaformer.create(str(tmp_path / "not-saved-here"))


def test_model_card_cites_the_papers_and_invents_no_url(tmp_path):
    from importlib import metadata

    metaformer.create("caformer_s18", num_classes=3).save_pretrained(tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "https://arxiv.org/abs/2210.13452" in card and "MetaFormer Baselines for Vision" in card
    assert "[More Information Needed]" not in card and "github.com/metaformer/metaformer" not in card
    try:
        listed = metadata.metadata("metaformer").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed: no project URL is known
        listed = []
    card_urls = {line.split(": ", 1)[1] for line in card.splitlines() if line.startswith("- ") and "http" in line
                 and "arxiv.org" not in line}
    assert card_urls == {entry.split(", ", 1)[1] for entry in listed}


@pytest.mark.filterwarnings("ignore:torch.*is deprecated:DeprecationWarning")  # the old API, called on purpose
def test_autocast_state_per_device_on_old_and_new_torch(monkeypatch):
    """tracing.autocast_enabled / autocast_dtype answer per device on this PyTorch, and through the per-device
    functions of PyTorch < 2.4, whose is_autocast_enabled takes no device and which has no get_autocast_dtype
    (the CUDA halves and the input checks ask them; pyproject allows torch >= 2.3)."""
    from metaformer import tracing
    from metaformer.tracing import autocast_dtype, autocast_enabled

    assert tracing.PER_DEVICE_AUTOCAST == (tracing._release(torch.__version__) >= (2, 4))

    def states():
        return autocast_enabled("cpu"), autocast_enabled("cuda"), autocast_dtype("cpu")

    assert states()[:2] == (False, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = states()
    assert new == (True, False, torch.bfloat16)
    cuda_dtype = torch.get_autocast_dtype("cuda") if tracing.PER_DEVICE_AUTOCAST else torch.get_autocast_gpu_dtype()
    assert autocast_dtype("cuda") == cuda_dtype
    if not tracing.PER_DEVICE_AUTOCAST:
        return  # this PyTorch has the old API itself: nothing to imitate

    cuda_enabled = torch.is_autocast_enabled  # the old API: no device argument, the plain function is CUDA's

    def old_torch(m):  # (torch.autocast itself calls the new API: patched only inside its context)
        m.setattr(torch, "is_autocast_enabled", lambda: cuda_enabled("cuda"))
        m.delattr(torch, "get_autocast_dtype")
        m.setattr(tracing, "PER_DEVICE_AUTOCAST", False)  # what tracing decides on PyTorch < 2.4

    with torch.autocast("cpu", dtype=torch.bfloat16), monkeypatch.context() as m:
        old_torch(m)
        assert states() == new
    with monkeypatch.context() as m:
        old_torch(m)
        assert states()[:2] == (False, False) and autocast_dtype("cuda") == cuda_dtype


def test_group_norm_avoids_the_crash_of_old_pytorch(monkeypatch):
    """PyTorch < 2.14 crashes (SIGSEGV) in the CPU backward of F.group_norm on a channels_last input that needs no
    gradient while the weight does: fine-tuning later stages of a partly frozen model, whose blocks run in
    channels_last on CPU. tracing.group_norm never hands ATen that case: one group runs on each sample's
    contiguous row without the affine (also for its digits), more groups, on a PyTorch < 2.14, on a contiguous
    copy. With the old-release branch forced on: the same values, gradients and layout as F.group_norm on the
    NCHW copy, and ATen's kernel given a channels_last input only where no crash can follow."""
    from torch.nn import functional as F

    from metaformer import tracing
    from metaformer.layers import GroupNorm1

    assert tracing.GROUP_NORM_BACKWARD_CRASHES == (tracing._release(torch.__version__) < (2, 14))
    assert tracing._release("2.13.0+cpu") == (2, 13) and tracing._release("2.15.0a0+git1234") == (2, 15)
    seen, plain = [], F.group_norm

    def recording(x, groups, weight=None, *args):
        seen.append((x.dim(), x.is_contiguous(), weight is not None))
        return plain(x, groups, weight, *args)

    # the flag is group_norm's default `guard` (TorchScript reads no global): force the branch there
    assert inspect.signature(tracing.group_norm).parameters["guard"].default is tracing.GROUP_NORM_BACKWARD_CRASHES
    monkeypatch.setattr(tracing.group_norm, "__defaults__", (True, False))  # guard, affine_in_place
    monkeypatch.setattr(tracing.F, "group_norm", recording)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 5, 7)
    for groups in (1, 2):
        norm = GroupNorm1(6) if groups == 1 else torch.nn.GroupNorm(2, 6)
        with torch.no_grad():
            norm.weight.normal_(), norm.bias.normal_()
        seen.clear()
        y = tracing.group_norm(x, groups, norm.weight, norm.bias, 1e-5)
        # one group: the (B, 1, C*H*W) rows without the affine; two: the contiguous copy, with it
        assert seen == ([(3, True, False)] if groups == 1 else [(4, True, True)])
        assert y.is_contiguous(memory_format=torch.channels_last)
        got = torch.autograd.grad(y, (norm.weight, norm.bias), g)
        want_y = plain(x.contiguous(), groups, norm.weight, norm.bias, 1e-5)
        want = torch.autograd.grad(want_y, (norm.weight, norm.bias), g)
        torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    seen.clear()
    tracing.group_norm(x.detach().requires_grad_(), 2, norm.weight, norm.bias, 1e-5)  # the input needs a gradient
    with torch.no_grad():
        tracing.group_norm(x, 2, norm.weight, norm.bias, 1e-5)  # no backward
    tracing.group_norm(x.contiguous(), 2, norm.weight, norm.bias, 1e-5)  # NCHW
    assert seen == [(4, False, True), (4, False, True), (4, True, True)]  # PyTorch's own call


def test_scripted_group_norm_avoids_the_crash_of_old_pytorch():
    """The same case through TorchScript: a scripted GroupNorm1 (a scripted PoolFormer's) on a channels_last input
    that needs no gradient, with a weight that needs one, then its backward. On PyTorch < 2.14 the scripted code
    takes tracing.group_norm's contiguous copy too (before, it called F.group_norm and the backward crashed the
    process); on any release, the values, gradients and layout of F.group_norm on the NCHW copy."""
    from torch.nn import functional as F

    from metaformer.layers import GroupNorm1

    norm = GroupNorm1(6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    scripted = torch.jit.script(norm)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 5, 7)
    y = scripted(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(y, (norm.weight, norm.bias), g)
    want_y = F.group_norm(x.contiguous(), 1, norm.weight, norm.bias, 1e-5)
    want = torch.autograd.grad(want_y, (norm.weight, norm.bias), g)
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
