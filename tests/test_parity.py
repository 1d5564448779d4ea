"""Parity with the original releases: random weights saved in the original layout, loaded through
`create(checkpoint=...)`, must give the original code's logits. The original side (tests/reference) is
written from the papers (arXiv 2111.11418, 2210.13452) and the original code (sail-sg/poolformer,
sail-sg/metaformer), independently of the library."""

import pytest
import torch
from helpers import built_model
from reference import original_baselines, original_v1, save_original

import metaformer

V1 = original_v1.MODEL_NAMES
BASELINES = original_baselines.MODEL_NAMES
FIXED_224 = {"metaformer_pppa_s12_224", "metaformer_ppaa_s12_224", "metaformer_pppf_s12_224",
             "metaformer_ppff_s12_224"} | {n for n in BASELINES if n.startswith("randformer")}


LARGE = 50_000_000  # parameters: the m36, m48 and b36 variants


def _assert_rel_close(got, expected, rel):
    """Max error relative to the output's scale below `rel` (and elementwise within rel too)."""
    scale = expected.abs().max().item()
    assert scale > 1e-2  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


def test_every_model_is_covered():
    assert set(V1) | set(BASELINES) == set(metaformer.list_models())
    assert len(metaformer.list_models()) == 33


@pytest.mark.parametrize("name", V1 + BASELINES)
def test_param_count_matches_release(name):
    model = built_model(name)
    expected = {**original_v1.PARAM_COUNTS, **original_baselines.PARAM_COUNTS}[name]
    # RandFormer's frozen random matrices are buffers here, parameters in the release: count_parameters
    # adds them back; the trainable parameters are the rest.
    assert model.count_parameters() == expected
    frozen = sum(b.numel() for n, b in model.named_buffers() if n.endswith("random_matrix"))
    assert sum(p.numel() for p in model.parameters()) == expected - frozen
    assert (frozen > 0) == name.startswith("randformer")
    assert metaformer.get_variant(name).params == expected


@pytest.mark.parametrize("name", V1 + BASELINES)
def test_original_logits(name, tmp_path):
    ref_mod = original_v1 if name in V1 else original_baselines
    ref = ref_mod.randomize_(ref_mod.build(name), seed=len(name)).eval()
    path = tmp_path / f"{name}.pth.tar"
    save_original(ref, path)
    ours = metaformer.create(name, checkpoint=str(path)).eval()

    if name in FIXED_224:
        sizes = [(224, 224)]
    else:  # the large variants only at the odd size (the same code as their family's small ones at 224)
        sizes = [(97, 131)] if metaformer.get_variant(name).params > LARGE else [(224, 224), (97, 131)]
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            _assert_rel_close(ours(x), ref(x), 1e-5)
        ref.double(), ours.double()
        for h, w in sizes[-1:]:
            x = torch.randn(1, 3, h, w, dtype=torch.float64)
            _assert_rel_close(ours(x), ref(x), 1e-9)
