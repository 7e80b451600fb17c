"""Progress bars on stderr (tqdm), off when not wanted or when stderr is not a terminal in tests."""

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, desc=None, total=None, unit="it", enabled=True):
    """A tqdm bar on stderr; a plain pass-through when ``enabled`` is false."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)
