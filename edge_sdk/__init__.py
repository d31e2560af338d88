"""cotune edge SDK: the device side of federated co-tuning.

Importing this package is cheap: heavy libraries (torch, transformers, peft) load only
inside the functions that train or run models.
"""

__version__ = "0.1.0"
