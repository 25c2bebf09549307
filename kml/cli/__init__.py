"""Command-line entry points: kml-train, kml-eval, kml-transference, kml-results, kml-download.

Each module's ``main(argv=None) -> int`` is its entry point; importing one does not import torch.
"""

__all__: list[str] = []
