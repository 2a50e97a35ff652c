"""Module-name patterns of a recipe (`targets`, `ignore`, `overrides.pattern`): checked when the recipe is validated,
matched safely when a pass selects modules."""

from __future__ import annotations

import math
import re
from typing import Annotated

import regex
from pydantic import AfterValidator

from compress.errors import RecipeError

MAX_PATTERN = 256  # characters of one pattern: keeps compiling cheap; a module name is far shorter
MAX_REPEATS = 1024  # product of a pattern's {m,n} counts (regex unrolls them when compiling)
PATTERN_TIMEOUT_S = 1.0  # one module-name search; a sane pattern takes microseconds
_COUNTED = re.compile(r"\{(\d*),?(\d*)\}")  # {m}, {m,}, {,n}, {m,n}


def check_pattern(p: str) -> str:
    """A Python `re` pattern of at most MAX_PATTERN characters whose counted repeats ({m,n}) multiply to at most
    MAX_REPEATS: `regex` (which matches it; see `pattern_search`) unrolls nested counts when compiling, so
    `(?:a{1000}){1000}` takes a second and `(?:a{65535}){65535}` forever, and no module name is that long anyway."""
    if len(p) > MAX_PATTERN:
        raise ValueError(f"a pattern of {len(p)} characters; at most {MAX_PATTERN}")
    try:
        re.compile(p)
    except (re.error, ValueError, OverflowError, RecursionError) as err:
        raise ValueError(f"{p!r} is not a valid regex: {err}") from None
    product = math.prod(max(int(n or 0) for n in m.groups()) or 1 for m in _COUNTED.finditer(p))
    if product > MAX_REPEATS:
        raise ValueError(f"{p!r}: its counted repeats multiply to {product}; at most {MAX_REPEATS}")
    try:
        regex.compile(p)
    except (regex.error, ValueError, OverflowError, RecursionError) as err:
        raise ValueError(f"{p!r} is not a valid regex: {err}") from None
    return p


# a recipe field holding one pattern, checked at validation (pydantic reports the ValueError with the field path)
Pattern = Annotated[str, AfterValidator(check_pattern)]


def pattern_search(pattern: str, name: str, field: str) -> bool:
    r"""Whether regex `pattern` occurs in module `name`; refuses, naming `field`, a pattern that backtracks too long.

    Matched with the `regex` package (re-compatible syntax, already required by transformers) under a time limit:
    Python's `re` has none, and a nested repeat such as `^([\w.]+\.?)*\d$` backtracks for minutes on one module
    name. `regex` guards most such patterns itself (that one takes microseconds), and PATTERN_TIMEOUT_S stops the
    rest. A static ban on nested quantifiers would refuse useful patterns and still miss sequential ones
    (`.*.*.*...x`), so the limit is the guarantee and the length bound (MAX_PATTERN) keeps compiling cheap."""
    try:
        return regex.search(pattern, name, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        raise RecipeError(f"{field}: pattern {pattern!r} took over {PATTERN_TIMEOUT_S} s on module {name!r} "
                          "(nested repeats backtrack); simplify it") from None
