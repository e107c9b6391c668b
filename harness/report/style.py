"""One look for every plot and table of a report: a method's display name and its colour.

* :func:`display_name`: ``method`` or ``method [variant]`` (the registered name, so a reader can type it), the
  one name of an arm in the table, the plots' legends and labels, the HTML page and claims.md (whose ``Arm.name``
  adds `` @size``).
* :func:`method_colour`: a method's colour, the same in every figure of every study, from a colour-blind-safe
  palette (Okabe and Ito's eight, black for vanilla, yellow left out: too pale on white, then Paul Tol's muted
  scheme for methods that are not in tree). Variants of a method share its colour; sizes get markers.
"""

from __future__ import annotations

import hashlib

# Okabe-Ito, fixed per in-tree method so that PonderLM-3 is vermillion in every figure of every study
_FIXED = {"vanilla": "#000000", "ponderlm3": "#D55E00", "ponderlm2": "#0072B2", "looped": "#009E73",
          "pause": "#CC79A7", "pondering": "#E69F00", "mor": "#56B4E9", "adaponder": "#882255",
          # the later baselines take Paul Tol's muted colours, one each, so that no two in-tree methods share one
          "recurrent_depth": "#332288", "recurrent_depth_adaptive": "#44AA99", "cotformer": "#999933",
          "cotformer_adaptive": "#AA4499", "mod": "#CC6677"}
# for methods from plugins, by a stable hash of the name: Tol's muted colours _FIXED leaves, and three of his others
_OTHERS = ("#117733", "#DDCC77", "#88CCEE", "#661100", "#6699CC", "#888888")  # none of _FIXED's
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
LINE_STYLES = ("-", "--", ":", "-.")


def display_name(method: str, variant: str | None = None) -> str:
    """The name of an arm (without its size) in every plot and table."""
    return f"{method}" + (f" [{variant}]" if variant else "")


def method_colour(method: str) -> str:
    """A method's colour (hex), the same in every plot."""
    if method in _FIXED:
        return _FIXED[method]
    digest = int(hashlib.sha1(method.encode("utf-8")).hexdigest(), 16)
    return _OTHERS[digest % len(_OTHERS)]


def palette(methods) -> dict[str, str]:
    return {m: method_colour(m) for m in methods}


__all__ = ["LINE_STYLES", "MARKERS", "display_name", "method_colour", "palette"]
