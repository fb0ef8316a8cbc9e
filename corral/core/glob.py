"""Glob matching shared by selectors (``~``), allow-lists and webhook routing: one semantics.

Lives apart from the selector language so that the agent, which matches executable paths
against allow-lists, does not load the selector parser.
"""

from __future__ import annotations


def glob_match(pattern: str, text: str) -> bool:
    """Case-sensitive whole-string glob: ``*`` any run (newlines too), ``?`` one character.

    Greedy matching with backtracking to the last ``*`` only: O(len(pattern) * len(text)) in
    the worst case, unlike a regex translation that can go exponential on ``*a*a*a*b``.
    """
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif star >= 0:
            # Let the last '*' swallow one more character and retry from there.
            mark += 1
            p, t = star + 1, mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)
