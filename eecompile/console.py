"""The rich console the CLI's reports print on.

Reports carry user strings: tensor names (``logits[0]``), shapes (``[B, T]``, ``[time, B, 6]``), file paths and
notes quoting them. With rich's default console markup on, ``[B, T]`` is read as a style tag and vanishes and
``:name:`` may turn into an emoji, so every report prints on a console with both off; emphasis a report wants
is given as a ``style`` (or a :class:`rich.text.Text`), never as markup inside a string. rich is imported here,
lazily by the callers (it is part of the CLI install, not of the runtime).
"""

from __future__ import annotations

from typing import Any


def report_console(**kwargs: Any) -> Any:
    """A :class:`rich.console.Console` that prints strings literally (``markup=False, emoji=False``); ``kwargs``
    go to the Console (``width``, ``stderr``, ...)."""
    from rich.console import Console

    return Console(markup=False, emoji=False, **kwargs)
