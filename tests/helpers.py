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
