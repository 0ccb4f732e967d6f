"""sensq: which layers of a video diffusion transformer can run in 4 bits, and proof that they can.

The library never prints; the `sensq` command line (``sensq.cli``) renders what it returns.
Importing ``sensq`` does no work beyond defining names.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "quantize_"]


def __getattr__(name: str):
    """``sensq.quantize_(module_or_model, plan, ...)`` (:func:`sensq.quant.quantize_`), imported on first use so
    that ``import sensq`` stays free of torch and diffusers."""
    if name == "quantize_":
        from sensq.quant import quantize_

        return quantize_
    raise AttributeError(f"module 'sensq' has no attribute {name!r}")
