"""One exception family, raised everywhere, with the cell line in the message.

>>> raise InterventionError("layer index 9 is past the end: transformer.h has 4 layers", line=3)
Traceback (most recent call last):
...
ipy_intervene.errors.InterventionError: line 3: layer index 9 is past the end: transformer.h has 4 layers
"""

from __future__ import annotations


class InterventionError(Exception):
    """A cell, a site or an input was not what ipy_intervene expected.

    ``line`` is the cell line (1-based) the problem is on, when known; ``detail`` is the
    message without the line prefix.
    """

    def __init__(self, detail: str, *, line: int | None = None) -> None:
        self.detail = detail
        self.line = line
        super().__init__(self._text())

    def _text(self) -> str:
        return f"line {self.line}: {self.detail}" if self.line is not None else self.detail

    def at_line(self, line: int | None) -> "InterventionError":
        """Attach the cell line if the error does not have one yet; returns ``self``."""
        if self.line is None and line is not None:
            self.line = line
            self.args = (self._text(),)
        return self


class CellSyntaxError(InterventionError):
    """The cell is not valid Python, or not a valid trace cell."""


class SiteError(InterventionError):
    """A module site does not exist, cannot be reached, or was used out of order."""


class MissingAttributeError(SiteError, AttributeError):
    """A module has no such child or attribute (an AttributeError too, so ``hasattr`` and
    ``getattr(x, name, default)`` keep working)."""


class ValueMismatchError(InterventionError):
    """A value written into a site has the wrong shape or structure."""


class InputError(InterventionError):
    """The INPUT of a trace, or a sweep's prompts, cannot be turned into model inputs."""


def cell_line(exc: BaseException, filename: str) -> int | None:
    """The last line of the cell (by its filename) in ``exc``'s traceback, or None."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class PositionError(SiteError, IndexError):
    """An index past the end of a site's value (a position past the prompt); an IndexError
    too, so ``except IndexError`` keeps working."""
