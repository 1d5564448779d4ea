"""What the Triton kernel families share about their tile sizes: a frozen dataclass of positive integers
(some powers of two), validated on construction, and one current configuration per family with
``get`` / ``set`` / ``configured``.
"""

from __future__ import annotations

import contextlib
import dataclasses

__all__ = ["ConfigSlot", "cdiv", "next_power_of_2", "validate"]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers: ``triton.cdiv`` on the host.

    Triton 3.5 and later wrap ``triton.cdiv`` and ``triton.next_power_of_2`` as constexpr functions, whose
    host-side call unwraps every argument (about 5 us a call on a desktop CPU); the launch code computes
    tens of these per block, so it uses these plain ones.
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two at least ``n`` (0 for ``n`` <= 0): ``triton.next_power_of_2`` on the host."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def validate(config, powers_of_two=()) -> None:
    """Raises ValueError unless every field of ``config`` is a positive int and those named are powers of two."""
    kind = type(config).__name__
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{kind}.{f.name} must be a positive integer, got {v!r}")
    for name in powers_of_two:
        v = getattr(config, name)
        if v & (v - 1):
            raise ValueError(f"{kind}.{name} must be a power of two, got {v}")


class ConfigSlot:
    """The current configuration of one kernel family (``current``)."""

    def __init__(self, config):
        self.current = config

    def set(self, config=None, **changes):
        """Sets ``config`` (default: the current one) with ``changes`` applied; returns the previous one.

        Raises:
            ValueError: On an unknown field or an invalid size.
        """
        previous = self.current
        names = [f.name for f in dataclasses.fields(previous)]
        unknown = set(changes) - set(names)
        if unknown:
            raise ValueError(f"unknown {type(previous).__name__} fields {sorted(unknown)}; valid: {names}")
        self.current = dataclasses.replace(previous if config is None else config, **changes)
        return previous

    @contextlib.contextmanager
    def configured(self, **changes):
        """``set(**changes)`` inside, the previous configuration after."""
        previous = self.set(**changes)
        try:
            yield self.current
        finally:
            self.set(previous)

    def functions(self):
        """The family's public ``get_config``, ``set_config`` and ``configured``, documented for its class."""
        kind = type(self.current).__name__

        def get_config():
            return self.current

        def set_config(config=None, **changes):
            return self.set(config, **changes)

        def configured(**changes):
            return self.configured(**changes)

        get_config.__doc__ = f"Returns the current :class:`{kind}`."
        set_config.__doc__ = f"""Sets the kernels' tile sizes; returns the previous configuration.

    Args:
        config: A whole :class:`{kind}` (default: the current one).
        **changes: Fields of :class:`{kind}` to change.

    Raises:
        ValueError: On an unknown field or an invalid size.
    """
        configured.__doc__ = "Context manager: ``set_config(**changes)`` inside, the previous configuration after."
        return get_config, set_config, configured
