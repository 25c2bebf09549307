"""Command-line entry points: kml-train, kml-eval, kml-transference."""
