"""Shared helpers of the test suite."""

import functools


@functools.cache
def built_model(name: str, **kwargs):
    """One shared instance per (name, kwargs): building the large variants is the slow part."""
    import metaformer

    return metaformer.create(name, **kwargs)


def input_size_for(name: str):
    """Small inputs for speed; models with fixed-size parts need their 224x224."""

    model = built_model(name)
    return (224, 224) if model.pretrained_cfg["fixed_input_size"] else (64, 64)


def place_release_identityformer_s12(folder):
    """Puts a random identityformer_s12 in the release's layout where ``pretrained=True`` finds it (the
    sail/dl Hub repo, offline cache) and returns that reference model (tests/reference)."""
    import torch
    from hub_cache import place_hub_file
    from reference import original_baselines

    ref = original_baselines.randomize_(original_baselines.build("identityformer_s12"), seed=11)
    torch.save(ref.state_dict(), folder / "identityformer_s12.pth")
    place_hub_file("sail/dl", "identityformer/identityformer_s12.pth", folder / "identityformer_s12.pth")
    return ref
