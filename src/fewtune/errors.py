"""User-facing errors: one line that says what was wrong, where, and what would be right."""

import difflib


class FewtuneError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2


def did_you_mean(name: str, choices) -> str:
    """' Did you mean: x?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    if close:
        original = next(c for c in choices if c.lower() == close[0])
        return f" Did you mean: {original}?"
    return ""


def unknown(kind: str, name: str, choices) -> FewtuneError:
    """`Unknown task 'mnly'. Did you mean: mnli? Known: cola, mnli.`"""
    choices = sorted(choices)
    return FewtuneError(f"Unknown {kind} '{name}'.{did_you_mean(name, choices)} Known: {', '.join(choices)}.")


def one_line(e: BaseException, limit: int = 300) -> str:
    """A library exception's message on one line, cut to `limit` characters (its type's name when it has none)."""
    text = " ".join(str(e).split())
    return text[:limit] if text else type(e).__name__
