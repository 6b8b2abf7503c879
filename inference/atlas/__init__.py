"""The bundled head-CT template and lobar atlas, and registration of the template to a subject.

- :mod:`inference.atlas.bundle`: the data (``data/``: template, atlas, licences,
  metadata, the 31-label -> 10-region mapping) and its loaders.
- :mod:`inference.atlas.registration`: template -> subject registration and
  :class:`~inference.atlas.registration.AtlasSegmenter` (the network Segmenter's interface).
- :mod:`inference.atlas.build`: the maintainer's script that made ``data/`` from the sources.
"""
