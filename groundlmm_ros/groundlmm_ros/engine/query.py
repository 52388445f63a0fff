"""The one check of a query's text, wherever it enters (the node's topics and action, the
Engine, the CLI): model-free, so the node can refuse a bad query before it takes a place in the
queue. What the text tokenizes to is checked by the Engine (Engine.check), before the model runs.
"""

from __future__ import annotations

import unicodedata

from groundlmm_ros.engine.types import MODES


def _visible(character: str) -> bool:
    """Not whitespace and not a zero-width or other format character (Unicode category Cf)."""
    return not (character.isspace() or unicodedata.category(character) == "Cf")


def query_problem(query: str, mode: str, max_query_length: int) -> str:
    """Why the query cannot be run ('' if it can): an unknown mode, no visible character, more
    than max_query_length characters, text that was not valid UTF-8, or a control character."""
    if mode not in MODES:
        return f"unknown mode {mode!r}: expected one of {', '.join(MODES)}"
    if not isinstance(query, str):
        return f"query must be text, got {type(query).__name__}"
    if not any(map(_visible, query)):
        return "empty query (no visible character)"
    if len(query) > max_query_length:
        return f"query has {len(query)} characters, more than max_query_length={max_query_length}"
    # rclpy decodes invalid UTF-8 in a string field to U+FFFD instead of failing.
    if "\ufffd" in query:
        return "query is not valid UTF-8 text (it holds replacement characters U+FFFD)"
    control = next(
        (c for c in query if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None
    )
    if control is not None:
        return f"query contains the control character U+{ord(control):04X}"
    return ""
