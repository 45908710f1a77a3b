"""How primitive names become prompt words: one policy per dataset, declared by its plugin.

The released CZSL codes (CSP, PLID, Troika, ClusPro) lower-case a name and replace ``.`` by a
space (UT-Zappos: ``Boots.Ankle`` -> ``boots ankle``). That is the ``dots`` policy, the default.
``dots-underscores`` also splits on ``_`` for datasets whose names use it as a word separator.
Every place that turns a name into text (prompts, vocabulary initialisation, feasibility, the
tiny CLIP's corpus) goes through :func:`clean_name`.
"""

from __future__ import annotations

from collections.abc import Callable


def _dots(name: str) -> str:
    return name.replace(".", " ").lower()


def _dots_underscores(name: str) -> str:
    return name.replace(".", " ").replace("_", " ").lower()


NAME_POLICIES: dict[str, Callable[[str], str]] = {"dots": _dots, "dots-underscores": _dots_underscores}
DEFAULT_POLICY = "dots"


def clean_name(name: str, policy: str = DEFAULT_POLICY) -> str:
    """``name`` as prompt words under ``policy`` (:data:`NAME_POLICIES`)."""
    try:
        return NAME_POLICIES[policy](name)
    except KeyError:
        raise ValueError(f"unknown name policy {policy!r}; use one of {', '.join(NAME_POLICIES)}") from None
