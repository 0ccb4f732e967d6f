"""sensq: which layers of a video diffusion transformer can run in 4 bits, and proof that they can.

The library never prints; the `sensq` command line (``sensq.cli``) renders what it returns.
Importing ``sensq`` does no work beyond defining names.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
