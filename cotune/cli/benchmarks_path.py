"""The benchmarks ship with the source checkout, not the wheel (they are imported by nothing in the
package). `cotune bench ...` from an editable install finds them beside the package."""

from __future__ import annotations

import sys
from pathlib import Path


def use_checkout_benchmarks() -> None:
    """Put the source checkout on the import path when `benchmarks/` stands beside `cotune/`;
    RuntimeError with what to do when it is nowhere to be found."""
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import benchmarks  # noqa: F401
    except ImportError:
        raise RuntimeError("the benchmarks are part of the source checkout, not of the installed package: "
                           "clone the repository and install it with `pip install -e '.[dev]'`") from None
