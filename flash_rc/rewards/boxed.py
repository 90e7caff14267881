"""Find the last ``\\boxed{...}`` in a response, with balanced braces.

Why not a regex: box contents nest (``\\boxed{\\frac{1}{2}}``), and a regex over a 1 MB response with unbalanced
braces can backtrack for a long time. One ``rfind`` plus one linear scan is O(n) whatever the model wrote.
"""

from __future__ import annotations


def last_boxed(text: str, commands: tuple[str, ...] = ("\\boxed", "\\fbox")) -> str | None:
    """Content of the last ``<command>{...}`` in ``text`` (braces balanced), or None if absent or never closed."""
    starts = [(text.rfind(command + "{"), command) for command in commands]
    start, command = max(starts)
    if start < 0:
        return None
    open_brace = start + len(command)
    depth = 0
    for position in range(open_brace, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:position]
    return None
