"""A CUDA device that a CPU-only machine can run: catches device mixing with real numerics.

``FakeCudaTensor`` reports ``device == cuda:0`` and holds its data in a CPU tensor. Every aten op checks its
tensor arguments the way CUDA does (all on one device; a 0-dim CPU tensor may join a CUDA op) and raises the
same ``RuntimeError`` on a mix, then runs on the CPU data, so the whole numeric path runs: unlike
``FakeTensorMode``, ``.item()``, metrics and generations work. ``fake_cuda()`` makes ``.to("cuda")``,
``.cuda()``, ``.cpu()`` and factories given ``device="cuda"`` produce or unwrap these tensors, and tells
``torch.cuda`` (and sensq's kernel lookup) that a GPU without triton is present, so the reference backend
runs. ``.numpy()`` of a fake CUDA tensor raises, as it does on a real GPU. Inference only: a fake CUDA
tensor never requires grad (autograd would ask for the CUDA runtime), and ``param.data = t.cuda()`` (as diffusers'
group offloading does) makes a plain tensor that claims CUDA, which fails on use: not a harness for offloading.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CUDA = torch.device("cuda", 0)


class FakeCudaTensor(torch.Tensor):
    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                  device=CUDA, requires_grad=False,
                                                  storage_offset=inner.storage_offset())
        out.inner = inner
        return out

    def __tensor_flatten__(self):  # a traceable wrapper: Module.to swaps parameters in whole
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return FakeCudaTensor(inner_tensors["inner"])

    def __repr__(self):
        return f"FakeCudaTensor({self.inner!r})"

    def __reduce_ex__(self, protocol):
        raise RuntimeError("a (fake) CUDA tensor cannot be pickled here: move it to the CPU first")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = set()

        def visit(t):
            if isinstance(t, FakeCudaTensor):
                devices.add("cuda:0")
            elif isinstance(t, torch.Tensor) and t.dim() > 0 and t.device.type != "meta":
                devices.add(str(t.device))
            return t

        tree_map(visit, (args, kwargs))
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{' and '.join(sorted(devices))}! (in {func})")
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=torch.device("cpu"))  # a device move is handled by the mode
        args, kwargs = tree_map(_unwrap, (args, kwargs))
        return tree_map(_wrap, func(*args, **kwargs))


def _unwrap(t):
    return t.inner if isinstance(t, FakeCudaTensor) else t


def _wrap(t):
    return FakeCudaTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) else t


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


# untyped_storage: a wrapper has no storage of its own; safetensors and transformers compare storage pointers
# to find shared tensors, so they get the CPU data's storage (its pointer is a host one: only compared)
_TO_HOST = {torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__,
            torch.Tensor.tolist, torch.Tensor.untyped_storage}
_GUARDED = _TO_HOST | {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.contiguous,
                       torch.Tensor.nonzero}


class _FakeCudaMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.requires_grad_ and isinstance(args[0], FakeCudaTensor):
            return args[0]  # autograd on a CUDA device needs the CUDA runtime: the harness is for inference
        if func is torch.Tensor.copy_ and any(isinstance(t, FakeCudaTensor) for t in args[:2]):
            # copy_ may cross devices (that is what it is for); its binding sets a CUDA device guard
            _unwrap(args[0]).copy_(_unwrap(args[1]), *args[2:], **kwargs)
            return args[0]
        if func in _GUARDED and isinstance(args[0], FakeCudaTensor):
            # these Python bindings set a CUDA device guard before any dispatch: run them on the CPU data
            out = func(*tree_map(_unwrap, args), **kwargs)
            return out if func in _TO_HOST else _wrap(out)
        if _is_cuda(kwargs.get("device")):  # factories and new_*(..., device="cuda")
            return tree_map(_wrap, func(*args, **dict(kwargs, device="cpu")))
        return func(*args, **kwargs)

    @staticmethod
    def _move(func, args, kwargs):
        tensor, rest = args[0], args[1:]
        if func is torch.Tensor.cpu:
            return _unwrap(tensor)
        if func is torch.Tensor.cuda:
            device, dtype, non_blocking = CUDA, None, kwargs.get("non_blocking", False)
        else:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
        inner = _unwrap(tensor)
        if dtype is not None:
            inner = inner.to(dtype, copy=kwargs.get("copy", False))
        if device is None:
            return _wrap(inner) if isinstance(tensor, FakeCudaTensor) else inner
        if device.type == "cuda":
            return tensor if isinstance(tensor, FakeCudaTensor) and inner is tensor.inner else FakeCudaTensor(inner)
        return inner.to(device, non_blocking=non_blocking)


class _FakeCudaFactories(TorchDispatchMode):
    """Factories that composite ops call inside (``torch.where(c, 0, y)`` makes a scalar on ``c``'s device)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")) and func is not torch.ops.aten._to_copy.default:
            return tree_map(_wrap, func(*args, **dict(kwargs, device=torch.device("cpu"))))
        return func(*args, **kwargs)


def _import_before_the_gpu_appears() -> None:
    """Libraries that look at the GPU when first imported (torchao, transformers' hub kernels) must see
    the machine as it is: import what the chain uses while ``torch.cuda.is_available()`` is still False."""
    import importlib

    import diffusers

    for name in ("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan", "UniPCMultistepScheduler"):
        getattr(diffusers, name)
    for name in ("diffusers.hooks", "transformers.modeling_utils", "peft", "torchao.prototype.mx_formats"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """Inside: a CUDA GPU (no triton) that runs on the CPU and raises on device mixing."""
    from sensq.formats import backend

    _import_before_the_gpu_appears()
    backend.available(backend.Backend.TRITON, "cpu")  # the kernel registry is read before it is patched
    real_triton = backend._AVAILABLE[backend.Backend.TRITON]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setitem(backend._AVAILABLE, backend.Backend.TRITON,
                        lambda device_type: False if device_type == "cuda" else real_triton(device_type))
    with _FakeCudaMode(), _FakeCudaFactories():
        yield
