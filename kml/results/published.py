"""Published accuracies (%, 5-way unless stated), keyed by the set of modes, ways and shots.

MMAML's rows are from its repository's README (MAML / Multi-MAML / MMAML, averages over the modes). The KML
paper's rows are its 5-mode ProtoNet rows as reported second-hand (its PDF was not at hand; unverified).
Method names are kml's recipe names (``kml-train --recipe``).
"""

from __future__ import annotations

__all__ = ["FIVE", "KML_PAPER", "MMAML_README", "PUBLISHED", "published_rows", "SOURCES", "THREE", "TWO"]

TWO = frozenset({"omniglot", "miniimagenet"})
THREE = TWO | {"fc100"}
FIVE = THREE | {"cub", "aircraft"}

MMAML_README = "MMAML README (shaohua0116/MMAML-Classification)"
KML_PAPER = "KML paper, 5-mode ProtoNet rows (second-hand, unverified)"

# (modes, ways, shots) -> {recipe: accuracy}
PUBLISHED: dict[tuple[frozenset[str], int, int], dict[str, float]] = {
    (TWO, 5, 1): {"maml": 66.80, "multi-maml": 66.85, "mmaml": 69.93},
    (TWO, 5, 5): {"maml": 77.79, "multi-maml": 73.07, "mmaml": 78.73},
    (TWO, 20, 1): {"maml": 44.69, "multi-maml": 53.15, "mmaml": 47.80},
    (THREE, 5, 1): {"maml": 54.55, "multi-maml": 55.90, "mmaml": 57.47},
    (THREE, 5, 5): {"maml": 67.97, "multi-maml": 62.20, "mmaml": 70.15},
    (THREE, 20, 1): {"maml": 28.22, "multi-maml": 39.77, "mmaml": 36.27},
    (FIVE, 5, 1): {
        "maml": 44.09,
        "multi-maml": 45.46,
        "mmaml": 49.06,
        "protonet": 49.31,
        "multi-protonet": 50.69,
        "mprotonet": 51.75,
        "kml-protonet-released": 56.72,
    },
    (FIVE, 5, 5): {
        "maml": 54.41,
        "multi-maml": 55.92,
        "mmaml": 60.83,
        "protonet": 58.91,
        "multi-protonet": 59.88,
        "mprotonet": 59.95,
        "kml-protonet-released": 64.91,
    },
    (FIVE, 20, 1): {"maml": 28.85, "multi-maml": 33.78, "mmaml": 33.97},
}
SOURCES = {
    "maml": MMAML_README,
    "multi-maml": MMAML_README,
    "mmaml": MMAML_README,
    "protonet": KML_PAPER,
    "multi-protonet": KML_PAPER,
    "mprotonet": KML_PAPER,
    "kml-protonet-released": KML_PAPER,
}


def published_rows(modes: list[str], ways: int, shots: int) -> dict[str, float]:
    """The published average accuracy of each recipe for this setup (empty when no table has it)."""
    return dict(PUBLISHED.get((frozenset(modes), ways, shots), {}))
