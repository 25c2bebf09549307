"""Real datasets: download (or find), verify, extract and convert them into the cache.

One module per dataset (:mod:`~kml.data.sources.omniglot`,
:mod:`~kml.data.sources.miniimagenet`, :mod:`~kml.data.sources.fc100`,
:mod:`~kml.data.sources.cub`, :mod:`~kml.data.sources.aircraft`) says where its
archives come from, their checksums, the raw layout it reads and the class
split; :mod:`~kml.data.sources.folder` turns any image folder into a mode.
:func:`prepare` runs them; ``kml-download`` is its command line (``download.py`` at the
repository root is the same command).
"""

from kml.data.sources.prepare import SOURCES, SummaryRow, format_summary, prepare, resolve_datasets

__all__ = ["SOURCES", "SummaryRow", "format_summary", "prepare", "resolve_datasets"]
