"""The generated cuTile kernels run on the CPU: each program of a launch in turn, as plain
Python over torch tensors, so that a machine without a GPU (CI) checks what the kernels
compute, not only that they compile.

Inside :func:`emulated`, ``ct.launch`` runs a kernel's Python function once per block of its
grid, with ``cuda.tile`` replaced by this module's tile operations (``ct.load`` / ``ct.store``
/ ``ct.gather`` / ``tiled_view(...).atomic_store_add`` on arrays, ``ct.mma`` accumulating in
fp32, the softmax's ``exp2`` / ``max`` / ``sum``, ``ct.where``, ...), and the launchers accept
CPU tensors.  The operations follow cuTile's documented semantics (tile spaces, ``order``,
padding, floor division, NaN-ignoring ``max``), and the emulator stops with a
:class:`KernelFault` where a GPU would silently do something undefined or racy:

- a load or store whose tile lies entirely outside its array (or partly, with
  ``check_bounds=False``), or an ``Array.slice`` outside the documented bounds (undefined in
  cuTile);
- a load that reaches past its array with the padding left undetermined reads NaN (or, for
  integers, -2**30), so a result that depends on it shows;
- two programs of one launch writing the same element, or one reading an element that
  another, earlier in grid order, wrote (atomic adds excepted among themselves);
- a tile of more than one element used as a Python condition or index.

What it cannot show: the compiler's own faults (``attngen build`` compiles every kernel for
that), real races between atomics and their ordering (programs run one at a time, in grid
order), and speed.  Rounding differs from the GPU's only in the order of fp32 sums.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
import types
from typing import Optional

import torch

import cuda.tile as ct

from .runtime import inputs

__all__ = ["KernelFault", "emulated", "host_patches", "launch", "Array", "Tile", "SMS"]

#: multiprocessors of the emulated device (an H100 SXM / H200: what the key splits assume)
SMS = 132

#: what a load past the array reads when its padding is undetermined
_UNDETERMINED_INT = -(2 ** 30)


class KernelFault(RuntimeError):
    """A kernel did something a GPU would do silently wrong (undefined or racy)."""


# -- values ---------------------------------------------------------------------------------
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
           "int64": torch.int64, "uint8": torch.uint8, "bool_": torch.bool}


def _dtype(dtype) -> torch.dtype:
    """A torch dtype for a cuTile dtype, a torch dtype, or ``float``/``int``/``bool``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (float, int, bool):
        return {float: torch.float32, int: torch.int32, bool: torch.bool}[dtype]
    name = str(dtype).rsplit(".", 1)[-1]
    found = _DTYPES.get(name) or _DTYPES.get(name + "_")
    if found is None:
        raise KernelFault(f"dtype {dtype!r} is not emulated")
    return found


def _shape(shape) -> tuple:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _int(value, what: str) -> int:
    if isinstance(value, Tile):
        return value.__index__()
    if isinstance(value, bool) or not isinstance(value, int):
        raise KernelFault(f"{what} must be an integer, got {value!r}")
    return value


def _tensor(value, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(value, Tile):
        return value.t
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=like.dtype if like is not None else None)


def _common(*values):
    """The operands as tensors of one dtype (cuTile promotes tiles of different dtypes to a
    common one; a Python scalar takes the tile's dtype)."""
    tiles = [v.t for v in values if isinstance(v, Tile)]
    dtype = tiles[0].dtype
    for t in tiles[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.bool and any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        dtype = torch.int32
    if not dtype.is_floating_point and any(isinstance(v, float) for v in values):
        dtype = torch.float32
    return [v.t.to(dtype) if isinstance(v, Tile) else torch.tensor(v, dtype=dtype) for v in values]


def _binary(op):
    def forward(self, other):
        if not isinstance(other, (Tile, int, float, bool)):
            return NotImplemented
        a, b = _common(self, other)
        return Tile(op(a, b))

    def reverse(self, other):
        if not isinstance(other, (Tile, int, float, bool)):
            return NotImplemented
        b, a = _common(self, other)
        return Tile(op(a, b))
    return forward, reverse


class _Held:
    """A torch tensor held as a tile or an array: its shape, dtype and rank."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def shape(self) -> tuple:
        return tuple(self.t.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.t.dtype

    @property
    def ndim(self) -> int:
        return self.t.dim()


class Tile(_Held):
    """A tile: an immutable torch tensor with cuTile's operators."""

    __slots__ = ()

    def reshape(self, shape) -> "Tile":
        shape = _shape(shape)
        if torch.Size(shape).numel() != self.t.numel():
            raise KernelFault(f"reshape of a {self.shape} tile to {shape}")
        return Tile(self.t.reshape(shape))

    def astype(self, dtype, *, rounding_mode=None) -> "Tile":
        return Tile(self.t.to(_dtype(dtype)))

    def permute(self, axes) -> "Tile":
        return Tile(self.t.permute(*axes))

    def transpose(self, axis0=None, axis1=None) -> "Tile":
        return transpose(self, axis0, axis1)

    def item(self) -> "Tile":
        return self.reshape(())

    def __getitem__(self, index) -> "Tile":
        index = index if isinstance(index, tuple) else (index,)
        for i in index:
            whole = isinstance(i, builtins.slice) and i == builtins.slice(None)
            if not (i is None or i is Ellipsis or whole):
                raise KernelFault(f"a tile is indexed by ':' and None only, got {i!r}")
        return Tile(self.t[index])

    def _scalar(self, what: str):
        if self.t.dim() != 0:
            raise KernelFault(f"a {self.shape} tile used as {what}: only 0-d tiles are scalars")
        return self.t.item()

    def __index__(self) -> int:
        if self.t.dtype.is_floating_point or self.t.dtype == torch.bool:
            raise KernelFault(f"a {self.t.dtype} tile used as an index")
        return int(self._scalar("an index"))

    def __int__(self) -> int:
        return int(self._scalar("an int"))

    def __float__(self) -> float:
        return float(self._scalar("a float"))

    def __bool__(self) -> bool:
        return bool(self._scalar("a condition"))

    def __neg__(self) -> "Tile":
        return Tile(-self.t)

    def __invert__(self) -> "Tile":
        return Tile(~self.t)

    def __repr__(self) -> str:
        return f"Tile({self.t!r})"

    __add__, __radd__ = _binary(torch.add)
    __sub__, __rsub__ = _binary(torch.sub)
    __mul__, __rmul__ = _binary(torch.mul)
    __truediv__, __rtruediv__ = _binary(torch.true_divide)
    __floordiv__, __rfloordiv__ = _binary(lambda a, b: torch.div(a, b, rounding_mode="floor"))
    __mod__, __rmod__ = _binary(torch.remainder)        # Python's sign rule, as cuTile's %
    __pow__, __rpow__ = _binary(torch.pow)
    __and__, __rand__ = _binary(torch.bitwise_and)
    __or__, __ror__ = _binary(torch.bitwise_or)
    __xor__, __rxor__ = _binary(torch.bitwise_xor)
    __lt__, _ = _binary(torch.lt)
    __le__, _ = _binary(torch.le)
    __gt__, _ = _binary(torch.gt)
    __ge__, _ = _binary(torch.ge)
    __eq__, _ = _binary(torch.eq)
    __ne__, _ = _binary(torch.ne)
    __hash__ = None


class Array(_Held):
    """A kernel's array argument: a view of a CPU tensor."""

    __slots__ = ()

    @property
    def strides(self) -> tuple:
        return self.t.stride()

    def slice(self, axis, start, stop) -> "Array":
        axis = int(axis) % self.t.dim()
        start, stop, n = _int(start, "slice start"), _int(stop, "slice stop"), self.t.shape[axis]
        if not (0 <= start < n and start <= stop <= n):
            raise KernelFault(f"Array.slice(axis={axis}, start={start}, stop={stop}) of an axis of {n}: "
                              "cuTile needs 0 <= start < N and start <= stop <= N")
        return Array(self.t.narrow(axis, start, stop - start))

    def tiled_view(self, tile_shape, *, padding_mode=ct.PaddingMode.UNDETERMINED,
                   traversal_steps=None) -> "TiledView":
        if traversal_steps is not None:
            raise KernelFault("tiled_view(traversal_steps=...) is not emulated")
        return TiledView(self, _shape(tile_shape), padding_mode)


class TiledView:
    """``Array.tiled_view``: the array's tile space of one tile shape."""

    def __init__(self, array: Array, tile_shape: tuple, padding_mode):
        if len(tile_shape) != array.ndim:
            raise KernelFault(f"tiled_view of a {array.ndim}-D array with a {len(tile_shape)}-D tile shape")
        self.array, self.tile_shape, self.padding_mode = array, tile_shape, padding_mode

    @property
    def dtype(self) -> torch.dtype:
        return self.array.dtype

    def num_tiles(self, axis) -> int:
        return -(-self.array.shape[axis] // self.tile_shape[axis])

    def load(self, index, **hints) -> Tile:
        return load(self.array, index, self.tile_shape, padding_mode=self.padding_mode)

    def store(self, index, tile, **hints) -> None:
        store(self.array, index, tile)

    def atomic_store_add(self, index, update) -> None:
        tile = _as_tile(update, self.tile_shape, self.array.dtype)
        region, view, perm = _region(self.array.t, index, self.tile_shape, "atomic_store_add")
        _current().claim(self.array.t, perm, region, atomic=True)
        inside = tuple(builtins.slice(0, r.stop - r.start) for r in region)
        view[region] += tile.t[inside].to(self.array.dtype)


# -- memory ---------------------------------------------------------------------------------
def _index(index, what: str) -> tuple:
    return tuple(_int(i, what) for i in (index if isinstance(index, (tuple, list)) else (index,)))


def _perm(order, ndim: int) -> tuple:
    if order == "C":
        return tuple(range(ndim))
    if order == "F":
        return tuple(reversed(range(ndim)))
    order = tuple(int(o) for o in order)
    if sorted(order) != list(range(ndim)):
        raise KernelFault(f"order {order} is not a permutation of {ndim} axes")
    return order


def _region(t: torch.Tensor, index, shape: tuple, what: str, order="C", check_bounds=True):
    """The part of tile ``index`` (tile space of ``shape`` over ``t`` permuted by ``order``)
    inside the array, as slices of that permuted view; the view; the permutation.  Without
    ``check_bounds`` the tile must lie wholly inside."""
    perm = _perm(order, t.dim())
    view = t.permute(*perm)
    index = _index(index, f"{what} index")
    if len(index) != view.dim() or len(shape) != view.dim():
        raise KernelFault(f"{what}: a {view.dim()}-D array, index {index}, tile shape {shape}")
    region = []
    for i, size, n in zip(index, shape, view.shape):
        lo, hi = i * size, i * size + size
        if hi <= 0 or lo >= n:
            raise KernelFault(f"{what}: tile {index} of shape {shape} lies entirely outside an array of "
                              f"shape {tuple(view.shape)} (undefined in cuTile)")
        if not check_bounds and (lo < 0 or hi > n):
            raise KernelFault(f"{what}: tile {index} of shape {shape} reaches past an array of shape "
                              f"{tuple(view.shape)} with check_bounds=False (undefined in cuTile)")
        region.append(builtins.slice(builtins.max(lo, 0), builtins.min(hi, n)))
    return tuple(region), view, perm


def _pad_value(dtype: torch.dtype, padding_mode):
    mode = getattr(padding_mode, "name", str(padding_mode)).upper()
    if mode == "ZERO":
        return 0
    if mode == "NEG_ZERO":
        return -0.0
    if mode == "NAN" or (mode == "UNDETERMINED" and dtype.is_floating_point):
        return float("nan")
    if mode == "POS_INF":
        return float("inf")
    if mode == "NEG_INF":
        return float("-inf")
    return _UNDETERMINED_INT


def load(array: Array, index, shape, *, order="C", padding_mode=ct.PaddingMode.UNDETERMINED,
         check_bounds=True, latency=None, allow_tma=None, memory_order=None, memory_scope=None) -> Tile:
    shape = _shape(shape)
    t = array.t
    if shape == ():
        index = _index(index, "load index")
        if len(index) != t.dim() or not all(0 <= i < n for i, n in zip(index, t.shape)):
            raise KernelFault(f"scalar load at {index} of an array of shape {tuple(t.shape)}")
        _current().check_read(t, tuple(range(t.dim())), tuple(builtins.slice(i, i + 1) for i in index))
        return Tile(t[index].clone())
    region, view, perm = _region(t, index, shape, "load", order, check_bounds)
    _current().check_read(t, perm, region)
    out = torch.full(shape, _pad_value(t.dtype, padding_mode), dtype=t.dtype)
    out[tuple(builtins.slice(0, r.stop - r.start) for r in region)] = view[region]
    return Tile(out)


def _as_tile(tile, shape: tuple, dtype: torch.dtype) -> Tile:
    if not isinstance(tile, Tile):
        return Tile(torch.full(shape, tile, dtype=dtype))
    if tile.ndim == 0 and shape:
        return Tile(tile.t.expand(shape))
    return tile


def store(array: Array, index, tile, *, order="C", check_bounds=True, latency=None, allow_tma=None,
          memory_order=None, memory_scope=None) -> None:
    t = array.t
    if not isinstance(tile, Tile) or tile.ndim == 0:
        shape = (1,) * t.dim()
    else:
        shape = tile.shape
    if len(shape) != t.dim():
        raise KernelFault(f"store of a {len(shape)}-D tile into a {t.dim()}-D array")
    tile = _as_tile(tile, shape, t.dtype)
    region, view, perm = _region(t, index, shape, "store", order, check_bounds)
    _current().claim(t, perm, region)
    inside = tuple(builtins.slice(0, r.stop - r.start) for r in region)
    view[region] = tile.t.reshape(shape)[inside].to(t.dtype)


def gather(array: Array, indices, *, mask=None, padding_value=0, check_bounds=True, latency=None) -> Tile:
    t = array.t
    indices = indices if isinstance(indices, tuple) else (indices,)
    if len(indices) != t.dim():
        raise KernelFault(f"gather from a {t.dim()}-D array with {len(indices)} indices")
    idx = [_tensor(i).to(torch.int64) for i in indices]
    idx = torch.broadcast_tensors(*idx)
    valid = torch.ones(idx[0].shape, dtype=torch.bool)
    for i, n in zip(idx, t.shape):
        valid &= (i >= 0) & (i < n)
    if mask is not None:
        valid &= _tensor(mask).to(torch.bool)
    safe = [torch.where(valid, i, 0) for i in idx]
    owners = _current().owners_of(t)
    if owners is not None and bool((valid & (owners[tuple(safe)] != _current().program)
                                    & (owners[tuple(safe)] != _FREE)).any()):
        raise KernelFault("gather reads an element another program of this launch writes (a race)")
    values = t[tuple(safe)]
    return Tile(torch.where(valid, values, _tensor(padding_value, values).to(t.dtype)))


# -- arithmetic -----------------------------------------------------------------------------
def _scalar(value) -> torch.Tensor:
    """A Python scalar as a 0-d tile's tensor: a float is fp32, an int int32."""
    return torch.tensor(value, dtype=_dtype(type(value)))


def _map(fn, *args):
    values = _common(*args) if builtins.any(isinstance(a, Tile) for a in args) else [_scalar(a) for a in args]
    return Tile(fn(*values))


def exp(x, *, rounding_mode=None, flush_to_zero=False):
    return _map(torch.exp, x)


def exp2(x, *, flush_to_zero=False):
    return _map(torch.exp2, x)


def log(x):
    return _map(torch.log, x)


def log2(x):
    return _map(torch.log2, x)


def tanh(x, *, rounding_mode=None):
    return _map(torch.tanh, x)


def sqrt(x, *, rounding_mode=None, flush_to_zero=False):
    return _map(torch.sqrt, x)


def abs(x):
    return _map(torch.abs, x)


def truediv(x, y, *, rounding_mode=None, flush_to_zero=False):
    return _map(torch.true_divide, x, y)


def _fmax(a, b):
    return torch.fmax(a, b) if a.dtype.is_floating_point else torch.maximum(a, b)


def _fmin(a, b):
    return torch.fmin(a, b) if a.dtype.is_floating_point else torch.minimum(a, b)


def maximum(x, y, *, flush_to_zero=False, propagate_nan=False):
    return _map(torch.maximum if propagate_nan else _fmax, x, y)


def minimum(x, y, *, flush_to_zero=False, propagate_nan=False):
    return _map(torch.minimum if propagate_nan else _fmin, x, y)


def _elementwise(builtin, binary):
    """Python's ``max``/``min`` in a kernel: element-wise on tiles (cuTile's reading)."""
    def pick(*args, **kwargs):
        values = args[0] if len(args) == 1 else args
        if kwargs or not builtins.any(isinstance(v, Tile) for v in values):
            return builtin(*args, **kwargs)
        result = values[0]
        for v in values[1:]:
            result = binary(result, v)
        return result
    return pick


def _reduce(x: Tile, axis, keepdims, fn) -> Tile:
    t = x.t
    dims = tuple(range(t.dim())) if axis is None else ((axis,) if isinstance(axis, int) else tuple(axis))
    return Tile(fn(t, dims, keepdims))


def sum(x, axis=None, *, keepdims=False, rounding_mode=None, flush_to_zero=False):
    return _reduce(x, axis, keepdims, lambda t, d, k: t.sum(dim=d, keepdim=k, dtype=t.dtype))


def max(x, axis=None, *, keepdims=False, flush_to_zero=False, propagate_nan=False):
    def amax(t, d, k):
        if propagate_nan or not t.dtype.is_floating_point:
            return t.amax(dim=d, keepdim=k)
        # NaN ignored (a row of only NaN stays NaN), as cuTile's max
        m = torch.where(t.isnan(), float("-inf"), t).amax(dim=d, keepdim=k)
        return torch.where(t.isnan().all(dim=d, keepdim=k), float("nan"), m)
    return _reduce(x, axis, keepdims, amax)


def min(x, axis=None, *, keepdims=False, flush_to_zero=False, propagate_nan=False):
    return -max(-x, axis, keepdims=keepdims, propagate_nan=propagate_nan)


def where(cond, x, y):
    c = _tensor(cond).to(torch.bool)
    a, b = _common(x, y) if isinstance(x, Tile) or isinstance(y, Tile) else (_scalar(x), _scalar(y))
    return Tile(torch.where(c, a, b))


def full(shape, fill_value, dtype):
    return Tile(torch.full(_shape(shape), float(fill_value) if isinstance(fill_value, Tile) else fill_value,
                           dtype=_dtype(dtype)))


def zeros(shape, dtype):
    return full(shape, 0, dtype)


def ones(shape, dtype):
    return full(shape, 1, dtype)


def arange(size, *, dtype, start=0, step=1):
    return Tile(torch.arange(start, start + int(size) * step, step, dtype=_dtype(dtype)))


def astype(x, dtype, *, rounding_mode=None):
    return x.astype(dtype) if isinstance(x, Tile) else Tile(_scalar(x).to(_dtype(dtype)))


def reshape(x, shape):
    return x.reshape(shape)


def permute(x, axes):
    return x.permute(axes)


def transpose(x, axis0=None, axis1=None):
    if axis0 is None and axis1 is None:
        if x.ndim != 2:
            raise KernelFault(f"transpose of a {x.ndim}-D tile needs its two axes")
        axis0, axis1 = 0, 1
    return Tile(x.t.transpose(axis0, axis1))


def broadcast_to(x, shape):
    return Tile(_tensor(x).expand(_shape(shape)).clone())


def expand_dims(x, axis):
    return Tile(x.t.unsqueeze(axis))


def cat(tiles, axis):
    return Tile(torch.cat([t.t for t in tiles], dim=axis))


def mma(x, y, acc, *, use_fast_acc=False):
    """``x @ y + acc`` in ``acc``'s dtype; the products and their sum in fp32 (tensor cores'
    fp16 / bf16 inputs are exact in fp32)."""
    if x.dtype != y.dtype:
        raise KernelFault(f"mma of {x.dtype} by {y.dtype}: cuTile does not promote mma operands")
    if x.shape[-1] != y.shape[-2] or acc.shape[-2:] != (x.shape[-2], y.shape[-1]):
        raise KernelFault(f"mma of {x.shape} by {y.shape} into {acc.shape}")
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return Tile((acc.t.to(wide) + x.t.to(wide) @ y.t.to(wide)).to(acc.dtype))


def matmul(x, y):
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return mma(x, y, full((x.shape[-2], y.shape[-1]), 0, wide))


def cdiv(x, y):
    return -((-x) // y)


def bid(axis) -> int:
    return _current().bid[axis]


def num_blocks(axis) -> int:
    return _current().grid[axis]


# -- launches -------------------------------------------------------------------------------
_FREE, _ATOMIC = -1, -2


class _Launch:
    """One launch's grid, the running program, and which program wrote what (races)."""

    def __init__(self, grid: tuple):
        self.grid, self.bid, self.program = grid, (0, 0, 0), 0
        self._owners: dict = {}

    def owners_of(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Who wrote each element of ``t`` in this launch (a view shaped like ``t``), or None
        when nothing in its storage was written."""
        flat = self._owners.get(t.untyped_storage().data_ptr())
        if flat is None:
            return None
        return torch.as_strided(flat, t.shape, t.stride(), t.storage_offset())

    def check_read(self, t: torch.Tensor, perm: tuple, region: tuple) -> None:
        """``region`` of ``t`` permuted by ``perm`` is read by the running program."""
        owners = self.owners_of(t)
        if owners is None:
            return
        owners = owners.permute(*perm)[region]
        if bool(((owners != _FREE) & (owners != self.program)).any()):
            raise KernelFault(f"program {self.bid} reads an element another program of this launch "
                              "writes (a race)")

    def claim(self, t: torch.Tensor, perm: tuple, region: tuple, atomic: bool = False) -> None:
        """``region`` of ``t`` permuted by ``perm`` is written (or added to) by the running
        program."""
        key = t.untyped_storage().data_ptr()
        if key not in self._owners:
            numel = t.untyped_storage().nbytes() // t.element_size()
            self._owners[key] = torch.full((numel,), _FREE, dtype=torch.int32)
        owners = self.owners_of(t).permute(*perm)[region]
        if atomic:
            clash = (owners != _FREE) & (owners != _ATOMIC)
        else:
            clash = (owners != _FREE) & (owners != self.program)
        if bool(clash.any()):
            raise KernelFault(f"program {self.bid} writes an element another program of this launch "
                              "writes or adds to (a race)")
        owners.fill_(_ATOMIC if atomic else self.program)


_state = threading.local()


def _current() -> _Launch:
    launch_ = getattr(_state, "launch", None)
    if launch_ is None:
        raise KernelFault("a tile operation outside an emulated launch")
    return launch_


class _Namespace(types.SimpleNamespace):
    def __getattr__(self, name):
        raise KernelFault(f"cuda.tile.{name} is not emulated (attngen.emulator)")


_NAMES = ("load", "store", "gather", "exp", "exp2", "log", "log2", "tanh", "sqrt", "abs", "truediv",
          "maximum", "minimum", "sum", "max", "min", "where", "full", "zeros", "ones", "arange", "astype",
          "reshape", "permute", "transpose", "broadcast_to", "expand_dims", "cat", "mma", "matmul", "cdiv",
          "bid", "num_blocks")
TILE = _Namespace(**{name: globals()[name] for name in _NAMES},
                  **{name: getattr(ct, name) for name in ("PaddingMode", "RoundingMode", "MemoryOrder",
                                                          "MemoryScope", "IndexedWithInt64", "Constant")
                     if hasattr(ct, name)},
                  **{name: dtype for name, dtype in _DTYPES.items()})
_BUILTINS = {"max": _elementwise(builtins.max, maximum), "min": _elementwise(builtins.min, minimum)}


def _program(kernel) -> types.FunctionType:
    """The kernel's Python function, reading ``ct`` (and Python's max / min) as emulated, and
    its module's other names as they are now."""
    fn = getattr(kernel, "_pyfunc", kernel)
    names = {**fn.__globals__, "ct": TILE, **_BUILTINS}
    return types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)


def _argument(value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise KernelFault(f"an emulated kernel takes CPU tensors, got one on {value.device}")
        return Array(value)
    if isinstance(value, float):
        return float(torch.tensor(value, dtype=torch.float32))     # a float parameter is fp32
    return value


def launch(stream, grid, kernel, args) -> None:
    """``ct.launch`` emulated: every block of ``grid`` runs the kernel in turn, z, y, then x
    outermost."""
    grid = tuple(int(n) for n in grid) + (1,) * (3 - len(tuple(grid)))
    if builtins.any(n < 1 for n in grid):
        raise KernelFault(f"grid {grid}: every dimension must be at least 1")
    program = _program(kernel)
    arrays = tuple(_argument(a) for a in args)
    run = _Launch(grid)
    outer = getattr(_state, "launch", None)
    _state.launch = run
    try:
        for z in range(grid[2]):
            for y in range(grid[1]):
                for x in range(grid[0]):
                    run.bid = (x, y, z)
                    run.program += 1
                    program(*arrays)
    finally:
        _state.launch = outer


@contextlib.contextmanager
def host_patches(run_kernel):
    """The launchers' host side on the CPU: CUDA's device and stream calls made no-ops, CPU
    tensors taken (and CUDA ones refused), an H100's multiprocessor count, and ``ct.launch``
    replaced by ``run_kernel(stream, grid, kernel, args)``."""
    patches = [(torch.cuda, "device", lambda device: contextlib.nullcontext()),
               (torch.cuda, "current_stream", lambda *args: None),
               (torch.cuda, "is_current_stream_capturing", lambda: False),
               (inputs, "KERNEL_DEVICES", ("cpu",)),
               (inputs, "_multiprocessors", lambda device: SMS),
               (ct, "launch", run_kernel)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def emulated():
    """Within it, attngen's launchers run their kernels on the CPU (see the module's docstring)."""
    with host_patches(launch):
        yield
