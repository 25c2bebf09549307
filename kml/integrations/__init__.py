"""Optional integrations with other meta-learning libraries.

Nothing here is imported by ``import kml``; each integration imports its
library lazily and raises a one-line :class:`kml.errors.KMLError` naming the
install command when the library is missing.

- :mod:`kml.integrations.learn2learn`: learn2learn task sets as kml modes and
  episode sources, kml backbones inside ``learn2learn.algorithms.MAML``, kml
  episodes in learn2learn's ``(data, labels)`` form.
- :mod:`kml.integrations.install_learn2learn`: installs learn2learn 0.2.0 on
  current Python from its source distribution
  (``python -m kml.integrations.install_learn2learn``).
"""

__all__: list[str] = []  # nothing is imported eagerly: use the submodules
