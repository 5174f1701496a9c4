"""Errors of the ranks that the engine cannot step past."""
from __future__ import annotations


class RankFailedError(RuntimeError):
    """A worker rank died, hung past the timeout or broke a collective: the model cannot run any more steps."""
