"""Data: raw files -> cached image stores -> episodes.

* :mod:`kml.data.store`: :class:`ImageStore`, one mode and split as a uint8 tensor grouped by class, and
  :func:`split_by_class` for arrays;
* :mod:`kml.data.modes`: modes by name (datasets, synthetic, ``[NAME=]folder[,options]:PATH``) and :func:`load_stores`;
* :mod:`kml.data.sampler`: :class:`EpisodeSampler` and :class:`MixtureSampler`, seeded and batched;
* :mod:`kml.data.episode`: :class:`Episode`, the meta-batch every learner takes;
* :mod:`kml.data.plots`: :func:`plot_episode`; :mod:`kml.data.sources`: downloading and converting datasets.

The names below load on first use, so importing a submodule stays light.
"""

from __future__ import annotations

from kml._lazy import lazy_exports

_EXPORTS = {
    "Episode": "kml.data.episode",
    "EpisodeSampler": "kml.data.sampler",
    "MixtureSampler": "kml.data.sampler",
    "ImageStore": "kml.data.store",
    "split_by_class": "kml.data.store",
    "load_store": "kml.data.modes",
    "load_stores": "kml.data.modes",
    "expand_modes": "kml.data.modes",
    "known_modes": "kml.data.modes",
    "mode_label": "kml.data.modes",
    "with_folder_split": "kml.data.modes",
    "plot_episode": "kml.data.plots",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
