"""Read and write safetensors files (Hugging Face checkpoints, single or sharded) with NumPy.

Pure Python + NumPy, so memory-safe by construction: the reader validates the whole header
before touching any data, then hands out read-only, zero-copy views of a read-only mmap of
the file.  Every malformed file raises SafetensorsError (a ValueError) naming the file, the
tensor and the problem; it is a fuzzing target, so no input may crash, hang or read past the end.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import ntpath
import os
import reprlib
import stat
import struct
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["SafetensorsError", "SafeOpen", "safe_open", "load_file", "save_file",
           "CheckpointDir", "open_checkpoint", "DTYPES"]

#: safetensors dtype string -> the NumPy dtype of the arrays `get` returns (always little-endian).
#: NumPy has no bfloat16 or float8: BF16 comes back as its uint16 bits (convert with
#: ``moe.bfloat16_to_float32``) and the F8 types as their uint8 bits.  The sub-byte types
#: of recent safetensors releases (F4, F6_*) are not supported.
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"), "F8_E8M0": np.dtype("u1"),
    "C64": np.dtype("<c8"),
}
# dtypes whose NumPy arrays only carry the bits: save_file takes them from `dtypes=`.
_BIT_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")
# NumPy dtype (kind, itemsize) -> safetensors dtype, for save_file.
_INFER = {("f", 8): "F64", ("f", 4): "F32", ("f", 2): "F16",
          ("i", 8): "I64", ("i", 4): "I32", ("i", 2): "I16", ("i", 1): "I8",
          ("u", 8): "U64", ("u", 4): "U32", ("u", 2): "U16", ("u", 1): "U8",
          ("b", 1): "BOOL", ("c", 8): "C64"}

# What the reader accepts.  The reference is the official `safetensors` package (its Rust
# `SafeTensors::read_metadata` / `Metadata::validate`, checked against release 0.8.0):
# - 8-byte little-endian header length N <= MAX_HEADER_SIZE with 8 + N <= file size, then N
#   bytes of UTF-8 JSON: an object (whitespace around it, e.g. the space padding, is fine).
# - "__metadata__": an object of str -> str (or null, read as {}, as the reference does).
# - Every other key is a tensor: exactly {"dtype", "shape", "data_offsets"}; dtype in DTYPES;
#   shape a list of ints >= 0; data_offsets [begin, end], ints, 0 <= begin <= end <= data
#   size, end - begin == prod(shape) * itemsize.
# - Layout, as the reference enforces: the tensors sorted by data_offsets tile the data
#   buffer exactly: the first starts at 0, each starts where the previous one ends, the last
#   ends at the end of the file.  So no overlap, no gap, no trailing bytes, and an empty
#   tensor must sit on a boundary between others.  Every file the reference writes does.
# - Stricter than the reference: duplicate keys (it silently keeps the last), unknown fields
#   in a tensor entry (it ignores them), shapes NumPy cannot represent, and BOOL bytes other
#   than 0 / 1 (checked by `get`, since NumPy bools must be 0 or 1).
MAX_HEADER_SIZE = 100_000_000  # bytes; the reference implementation's limit
_INTP_MAX = int(np.iinfo(np.intp).max)


def _numpy_maxdims() -> int:
    try:
        np.empty((1,) * 64)
        return 64
    except ValueError:  # NumPy 1.x
        return 32


_MAXDIMS = _numpy_maxdims()


class SafetensorsError(ValueError):
    """A malformed safetensors file (or index): the message names the file, the tensor if
    any, and what is wrong.  I/O errors (a missing file, ...) are OSError, not this."""


class TensorInfo(NamedTuple):
    """One header entry; `begin`/`end` are relative to the start of the data buffer."""
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int


def _q(name: str) -> str:
    """A tensor name for a message: quoted, and cut short if absurdly long."""
    if len(name) > 80:
        name = name[:77] + "..."
    return repr(name)


def _num(n: int) -> str:
    """An integer for a message; a product of huge dims can exceed int->str limits."""
    return str(n) if n < 10**40 else f"about 10**{n.bit_length() * 30103 // 100000}"


def _typename(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                             type(value).__name__)


class _DuplicateKey(Exception):
    pass


class _TooManyStrayObjects(Exception):
    pass


_MAX_STRAY_OBJECTS = 1000


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _header_hook():
    """object_pairs_hook for a header: no duplicate keys, and an early stop when the header
    holds many objects that are neither tensor entries nor the top level (json.loads would
    otherwise build millions of them before validation could look at the first one)."""
    stray = 0

    def hook(pairs):
        nonlocal stray
        out = _no_duplicates(pairs)
        if len(out) == 3 and type(out.get("dtype")) is str and type(
                out.get("shape")) is list and type(out.get("data_offsets")) is list:
            return out  # shaped like a tensor entry
        if not any(type(v) is dict for v in out.values()):
            stray += 1  # __metadata__, or junk
            if stray > _MAX_STRAY_OBJECTS:
                raise _TooManyStrayObjects()
        return out
    return hook


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(label: str, raw: bytes, what: str, hook=_no_duplicates):
    """JSON bytes -> object, with duplicate keys and NaN/Infinity rejected."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafetensorsError(f"{label}: {what} is not valid UTF-8 ({exc})") from None
    try:
        return json.loads(text, object_pairs_hook=hook, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise SafetensorsError(f"{label}: {what} has the key {_q(exc.args[0])} more than "
                               f"once (duplicate names are ambiguous)") from None
    except _TooManyStrayObjects:
        raise SafetensorsError(f"{label}: {what} has more than {_MAX_STRAY_OBJECTS} objects "
                               f"that are not tensor entries (dtype, shape, data_offsets)"
                               ) from None
    except RecursionError:
        raise SafetensorsError(f"{label}: {what} is JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, too-long integers, NaN/Infinity
        raise SafetensorsError(f"{label}: {what} is not valid JSON ({exc})") from None


def _w(label: str, name: str) -> str:
    return f"{label}: tensor {_q(name)}"


def _parse_tensor(label: str, name: str, entry, data_size: int) -> TensorInfo:
    # (hot for headers of many tensors: the messages are only formatted on failure)
    if type(entry) is not dict:
        raise SafetensorsError(f"{_w(label, name)}: expected an object with dtype, shape and "
                               f"data_offsets, got {_typename(entry)}")
    if len(entry) != 3 or "dtype" not in entry or "shape" not in entry or \
            "data_offsets" not in entry:
        for key in _FIELDS:
            if key not in entry:
                raise SafetensorsError(f"{_w(label, name)} has no {key!r}")
        for key in entry:
            if key not in _FIELDS:
                raise SafetensorsError(f"{_w(label, name)} has the unknown field {_q(key)} "
                                       f"(expected only dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        if type(dtype) is not str:
            raise SafetensorsError(f"{_w(label, name)}: dtype must be a string, got "
                                   f"{_typename(dtype)}")
        raise SafetensorsError(f"{_w(label, name)} has unknown or unsupported dtype "
                               f"{_q(dtype)} (supported: {', '.join(DTYPES)})")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsError(f"{_w(label, name)}: shape must be a list of non-negative "
                               f"integers, got {_short(shape)}")
    if len(shape) > _MAXDIMS:
        raise SafetensorsError(f"{_w(label, name)} has {len(shape)} dimensions, more than "
                               f"NumPy supports ({_MAXDIMS})")
    if type(offsets) is not list or len(offsets) != 2 or not (
            type(offsets[0]) is int and type(offsets[1]) is int and offsets[0] >= 0
            and offsets[1] >= 0):
        raise SafetensorsError(f"{_w(label, name)}: data_offsets must be two non-negative "
                               f"integers [begin, end], got {_short(offsets)}")
    begin, end = offsets
    if end < begin:
        raise SafetensorsError(f"{_w(label, name)} has data_offsets [{begin}, {end}] with end "
                               f"before begin")
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{_w(label, name)} ({dtype}, shape {_short(shape)}) needs "
                               f"{_num(nbytes)} bytes but its data_offsets [{begin}, {end}] "
                               f"span {end - begin}")
    if end > data_size:
        raise SafetensorsError(f"{_w(label, name)} has data_offsets [{begin}, {end}] past the "
                               f"end of the data ({data_size} bytes)")
    # NumPy's own limits, reachable only with a zero in the shape (else nbytes <= file size).
    if nbytes == 0 and shape and (max(shape) > _INTP_MAX or
                                  math.prod(d for d in shape if d) * itemsize > _INTP_MAX):
        raise SafetensorsError(f"{_w(label, name)} has shape {_short(shape)}, too large for "
                               f"NumPy")
    return TensorInfo(dtype, tuple(shape), begin, end)


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = 8
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def _short(value) -> str:
    """A parsed JSON value for a message, cut short (a bad shape may have millions of items)."""
    return _REPR.repr(value)


_FIELDS = ("dtype", "shape", "data_offsets")
_ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# Headers longer than this get a vectorized structure check before json.loads (see below).
_GUARD_ABOVE = 1 << 20
_GUARD_CHUNK = 1 << 22


def _check_structure(label: str, raw: bytes) -> None:
    """Reject, before parsing it, a large header whose bracket structure no valid header has.

    json.loads builds every container of its input: a 100 MB header of nested or repeated
    empty lists / objects would take gigabytes and many seconds before the first check could
    fail.  A valid header is one object whose values are objects (tensor entries, metadata),
    whose values are scalars or lists (shape, data_offsets: at most 2 per entry) of scalars
    (at most _MAXDIMS each).  This pass (NumPy, in chunks, strings skipped) checks those
    bracket rules and counts; everything they reject, full validation would reject too, so
    it only changes how early (and how precisely worded) the error is.
    """
    start = raw.lstrip(b" \t\n\r")[:1]
    if start != b"{":
        got = {b"[": "an array", b'"': "a string", b"t": "a boolean", b"f": "a boolean",
               b"n": "null"}.get(start, "a number" if start in b"-0123456789" and start
                                 else None)
        raise SafetensorsError(f"{label}: header must be a JSON object, got {got}" if got else
                               f"{label}: header is not valid JSON (it starts with {start!r})")
    # Escaped backslashes, then escaped quotes, out: every quote left opens or closes a string.
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    parity = depth = 0
    objects2 = lists3 = commas1 = commas3 = 0
    for begin in range(0, len(text), _GUARD_CHUNK):
        b = np.frombuffer(text, np.uint8, count=min(_GUARD_CHUNK, len(text) - begin),
                          offset=begin)
        inside = (np.cumsum(b == 34, dtype=np.uint8) + parity) & 1  # 1 within a string
        parity = int(inside[-1])
        outside = inside == 0
        opens = ((b == 123) | (b == 91)) & outside
        closes = ((b == 125) | (b == 93)) & outside
        d = np.cumsum(opens.astype(np.int16) - closes.astype(np.int16), dtype=np.int16) + depth
        if (d > 3).any():
            raise SafetensorsError(f"{label}: header nests containers deeper than a "
                                   f"safetensors header (object -> object -> list)")
        if ((b == 91) & opens & (d == 2)).any():
            raise SafetensorsError(f"{label}: header has an array where a tensor entry or "
                                   f"__metadata__ object belongs")
        if ((b == 123) & opens & (d == 3)).any():
            raise SafetensorsError(f"{label}: header has an object inside a tensor entry or "
                                   f"__metadata__ (only strings and lists belong there)")
        commas = (b == 44) & outside
        objects2 += int(np.count_nonzero(opens & (d == 2)))
        lists3 += int(np.count_nonzero(opens & (d == 3)))
        commas1 += int(np.count_nonzero(commas & (d == 1)))
        commas3 += int(np.count_nonzero(commas & (d == 3)))
        if (d < 0).any():
            return  # unbalanced: json.loads reports it after parsing what came before
        depth = int(d[-1])
    if commas1 >= objects2 + 1 or lists3 > 2 * objects2 or commas3 > (_MAXDIMS - 1) * lists3:
        raise SafetensorsError(
            f"{label}: header has more values than its {objects2} tensor entries can hold "
            f"({commas1 + 1} top-level members, {lists3} lists, {commas3 + lists3} list items)")


def _parse_header(label: str, raw: bytes, data_size: int
                  ) -> Tuple[Dict[str, str], Dict[str, TensorInfo]]:
    if len(raw) > _GUARD_ABOVE:
        _check_structure(label, raw)
    header = _parse_json(label, raw, "header", _header_hook())
    if not isinstance(header, dict):
        raise SafetensorsError(f"{label}: header must be a JSON object, got "
                               f"{_typename(header)}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent, or null (which the reference accepts)
        metadata = {}
    elif not isinstance(metadata, dict):
        raise SafetensorsError(f"{label}: __metadata__ must be an object mapping strings to "
                               f"strings, got {_typename(metadata)}")
    else:
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise SafetensorsError(f"{label}: __metadata__ must map strings to strings, "
                                       f"but {_q(key)} is {_typename(value)}")
    tensors = {name: _parse_tensor(label, name, entry, data_size)
               for name, entry in header.items()}
    # Layout: like the reference implementation, the tensors sorted by data_offsets must
    # tile the data buffer exactly: no overlap, no gap, nothing after the last tensor.
    expected, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0])):
        if info.begin < expected:
            assert prev is not None  # expected > 0 only after a first tensor
            raise SafetensorsError(
                f"{label}: tensor {_q(name)} (data_offsets [{info.begin}, {info.end}]) "
                f"overlaps tensor {_q(prev[0])} (data_offsets [{prev[1].begin}, "
                f"{prev[1].end}])")
        if info.begin > expected:
            raise SafetensorsError(
                f"{label}: gap in the data: bytes [{expected}, {info.begin}) before tensor "
                f"{_q(name)} belong to no tensor (tensors must cover the data contiguously)")
        expected, prev = info.end, (name, info)
    if expected != data_size:
        raise SafetensorsError(
            f"{label}: the tensors end at byte {expected} of the data but the data is "
            f"{data_size} bytes: {data_size - expected} trailing bytes belong to no tensor")
    return metadata, tensors


class SafeOpen:
    """An open safetensors file: validated header, tensors as read-only mmap views.

    Opening reads and validates the whole header (raising SafetensorsError for anything
    malformed) and maps the file read-only.  ``get(name)`` returns a zero-copy, read-only
    NumPy view; views stay valid after ``close()`` (the mapping is released when the last
    one is garbage-collected).  BF16 tensors come back as uint16 bits and F8 tensors as
    uint8 bits (see DTYPES); BOOL tensors are checked to hold only 0 and 1 bytes on ``get``.
    """

    def __init__(self, path, framework: str = "numpy"):
        if framework not in ("numpy", "np"):
            raise ValueError(f"framework must be 'numpy' (or 'np'), got {framework!r}")
        self.path = path
        label = self._label = os.fsdecode(os.fspath(path))
        self._mmap = self._data = None
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO must not hang the open
        with open(fd, "rb", buffering=0, closefd=True) as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), label)
            if not stat.S_ISREG(st.st_mode):
                raise SafetensorsError(f"{label}: not a regular file")
            size = st.st_size
            if size < 8:
                raise SafetensorsError(
                    f"{label}: file is {'empty' if size == 0 else f'{size} bytes'}, too short "
                    f"for the 8-byte header length")
            n = struct.unpack("<Q", _read_exactly(f, 8, label))[0]
            if n > MAX_HEADER_SIZE:
                raise SafetensorsError(f"{label}: header length {n} is absurd (more than "
                                       f"{MAX_HEADER_SIZE} bytes)")
            if 8 + n > size:
                raise SafetensorsError(f"{label}: header length {n} runs past the end of the "
                                       f"file ({size} bytes)")
            raw = _read_exactly(f, n, label)
            self._data_start = 8 + n
            self._metadata, self._tensors = _parse_header(label, raw, size - 8 - n)
            try:
                self._mmap = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
            except ValueError as exc:  # the file shrank since fstat
                raise SafetensorsError(f"{label}: file changed while opening ({exc})") from None
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)  # read-only
        self._names = sorted(self._tensors)

    # -- the header ----------------------------------------------------------------------
    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return list(self._names)

    def metadata(self) -> Dict[str, str]:
        """The header's ``__metadata__`` (a copy; {} when absent)."""
        return dict(self._metadata)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self._label}: no tensor named {_q(name)}") from None

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("F32", "BF16", ...) of tensor `name`."""
        return self.info(name).dtype

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.info(name).shape

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._tensors)

    # -- the data ------------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only, zero-copy view of the mapped file."""
        info = self.info(name)
        if self._data is None:
            raise ValueError(f"{self._label}: the file is closed")
        offset = self._data_start + info.begin
        array = np.ndarray(info.shape, dtype=DTYPES[info.dtype], buffer=self._data,
                           offset=offset)
        array.flags.writeable = False
        if info.dtype == "BOOL" and array.size:
            if self._data[offset:self._data_start + info.end].max() > 1:
                raise SafetensorsError(f"{self._label}: tensor {_q(name)} (BOOL) holds bytes "
                                       f"other than 0 and 1")
        return array

    get_tensor = get  # the official safe_open's name

    def close(self) -> None:
        """Release the file.  Arrays from `get` stay valid: the mapping then lives on until
        the last of them is garbage-collected."""
        self._data = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views are alive: they keep the mapping
                pass
            self._mmap = None

    def __enter__(self) -> "SafeOpen":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._data is None else f"{len(self)} tensors"
        return f"<moe.safetensors.SafeOpen {self._label!r} ({state})>"


def _read_exactly(f, n: int, label: str) -> bytes:
    parts, left = [], n
    while left:
        part = f.read(left)  # an unbuffered read may return less than asked
        if not part:  # the file shrank since fstat
            raise SafetensorsError(f"{label}: file ended while reading its header")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def safe_open(path, framework: str = "numpy") -> SafeOpen:
    """Open and validate a safetensors file; use as a context manager."""
    return SafeOpen(path, framework)


def load_file(path) -> Dict[str, np.ndarray]:
    """All tensors of a file, name -> array.  The arrays are read-only zero-copy views of
    the mapped file (not copies: copy one with ``np.array(a)`` to modify it); the mapping
    is released when the last of them is garbage-collected."""
    with SafeOpen(path) as f:
        return {name: f.get(name) for name in f.keys()}


# ---- writing ---------------------------------------------------------------------------

def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Optional[Mapping[str, str]]
              = None, dtypes: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` (name -> array) as a safetensors file at `path`.

    The dtype is inferred from each array's NumPy dtype (float64/32/16, int/uint 8-64, bool,
    complex64); ``dtypes`` overrides it for arrays that hold bits: "BF16" for uint16 (or
    int16) bfloat16 bits, "F8_E4M3" / "F8_E5M2" / "F8_E8M0" for uint8 (or int8).  Output is
    always little-endian and C-ordered.  As in the reference implementation the header is
    space-padded to a multiple of 8 bytes and the tensors are laid out contiguously sorted by
    descending element size then name, so every tensor is aligned in the file.  `metadata`
    (str -> str) goes to ``__metadata__``.  The file is written under a temporary name and
    then renamed over `path`, so a file that is currently mapped (by load_file) is never
    truncated under its views.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> array, got "
                        f"{type(tensors).__name__}")
    dtypes = dict(dtypes or {})
    for name in dtypes:
        if name not in tensors:
            raise ValueError(f"dtypes names {name!r}, which is not among the tensors")
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a mapping of str -> str")
    entries = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__} {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        array = np.asarray(value)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        little = array.dtype.newbyteorder("<")
        if array.dtype != little:  # big-endian input (or a big-endian machine)
            array = array.astype(little)
        inferred = _INFER.get((array.dtype.kind, array.dtype.itemsize))
        st_dtype = dtypes.get(name, inferred)
        if st_dtype != inferred:
            if st_dtype not in _BIT_DTYPES:
                raise ValueError(f"dtypes[{name!r}] = {st_dtype!r}: only "
                                 f"{', '.join(_BIT_DTYPES)} can be given for arrays that "
                                 f"hold their bits (others are inferred from the array)")
            if array.dtype.kind not in "ui" or array.dtype.itemsize != DTYPES[st_dtype].itemsize:
                raise ValueError(f"tensor {name!r}: {st_dtype} needs an array of "
                                 f"{DTYPES[st_dtype].itemsize}-byte integers holding its bits, "
                                 f"got {array.dtype}")
        if st_dtype is None:
            raise TypeError(f"tensor {name!r}: NumPy dtype {array.dtype} has no safetensors "
                            f"equivalent")
        entries.append((name, st_dtype, array))

    entries.sort(key=lambda e: (-e[2].dtype.itemsize, e[0]))
    header: Dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, st_dtype, array in entries:
        header[name] = {"dtype": st_dtype, "shape": [int(d) for d in array.shape],
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a tensor name or metadata string is not valid Unicode ({exc})"
                         ) from None
    raw += b" " * (-len(raw) % 8)

    path = os.fsdecode(os.fspath(path))
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, _, array in entries:
                if array.size:
                    f.write(array.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---- Hugging Face checkpoint directories -----------------------------------------------

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _check_shard_name(label: str, filename) -> None:
    if not isinstance(filename, str) or not filename:
        raise SafetensorsError(f"{label}: shard file names must be non-empty strings, got "
                               f"{_short(filename)}")
    if "\0" in filename:
        raise SafetensorsError(f"{label}: shard file name {_q(filename)} contains a NUL byte")
    if (os.path.isabs(filename) or filename.startswith(("/", "\\"))
            or ntpath.splitdrive(filename)[0]):
        raise SafetensorsError(f"{label}: shard file name {_q(filename)} is an absolute path "
                               f"(shards must lie inside the checkpoint directory)")
    if ".." in filename.replace("\\", "/").split("/"):
        raise SafetensorsError(f"{label}: shard file name {_q(filename)} escapes the "
                               f"checkpoint directory with '..'")


class CheckpointDir:
    """A Hugging Face model directory: ``model.safetensors``, or the shards listed by
    ``model.safetensors.index.json`` (the single file wins when both exist, as in
    transformers).  All shards are opened and validated up front; every name of the index's
    weight_map must exist in the shard it names.  Shard names must be relative and free of
    '..' (symlinks are followed: the Hugging Face cache links shards into its blobs/).

    ``progress(i, n_files, filename)`` is called after shard i (1-based) of n_files is open.
    """

    def __init__(self, directory, progress: Optional[Callable[[int, int, str], object]] = None):
        self.directory = os.fsdecode(os.fspath(directory))
        single = os.path.join(self.directory, SINGLE_FILE)
        index_path = os.path.join(self.directory, INDEX_FILE)
        self._shards: Dict[str, SafeOpen] = {}
        if os.path.isfile(single):
            weight_map = None
            files = [SINGLE_FILE]
        elif os.path.isfile(index_path):
            weight_map = self._read_index(index_path)
            files = sorted(set(weight_map.values()))
            missing = [fn for fn in files
                       if not os.path.isfile(os.path.join(self.directory, fn))]
            if missing:
                raise FileNotFoundError(
                    f"{index_path}: {len(missing)} of {len(files)} shard files listed by "
                    f"the index are missing: {', '.join(map(repr, missing[:5]))}"
                    + (", ..." if len(missing) > 5 else ""))
        elif not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory}: no such directory")
        else:
            raise FileNotFoundError(f"{self.directory}: neither {SINGLE_FILE} nor "
                                    f"{INDEX_FILE} found")
        self.files: List[str] = files
        try:
            for i, fn in enumerate(files, 1):
                self._shards[fn] = SafeOpen(os.path.join(self.directory, fn))
                if progress is not None:
                    progress(i, len(files), fn)
            if weight_map is None:
                weight_map = {name: SINGLE_FILE for name in self._shards[SINGLE_FILE].keys()}
            for name, fn in weight_map.items():
                if name not in self._shards[fn]:
                    raise SafetensorsError(f"{index_path}: weight_map puts tensor {_q(name)} in "
                                           f"{fn!r}, which has no such tensor")
        except BaseException:
            self.close()
            raise
        self._weight_map = weight_map

    def _read_index(self, index_path: str) -> Dict[str, str]:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_HEADER_SIZE + 1)
        if len(raw) > MAX_HEADER_SIZE:
            raise SafetensorsError(f"{index_path}: index file larger than {MAX_HEADER_SIZE} "
                                   f"bytes")
        index = _parse_json(index_path, raw, "index")
        if not isinstance(index, dict):
            raise SafetensorsError(f"{index_path}: index must be a JSON object, got "
                                   f"{_typename(index)}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise SafetensorsError(f"{index_path}: index needs a 'weight_map' object (tensor "
                                   f"name -> shard file), got {_typename(weight_map)}")
        for filename in weight_map.values():
            _check_shard_name(index_path, filename)
        return weight_map

    def keys(self) -> List[str]:
        """Tensor names across all shards, sorted."""
        return sorted(self._weight_map)

    def file_of(self, name: str) -> str:
        """The shard file (relative to the directory) holding tensor `name`."""
        try:
            return self._weight_map[name]
        except KeyError:
            raise KeyError(f"{self.directory}: no tensor named {_q(name)}") from None

    def _shard(self, name: str) -> SafeOpen:
        fn = self.file_of(name)
        if fn not in self._shards:
            raise ValueError(f"{self.directory}: the checkpoint is closed")
        return self._shards[fn]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only, zero-copy view of its shard (see SafeOpen.get)."""
        return self._shard(name).get(name)

    def dtype(self, name: str) -> str:
        return self._shard(name).dtype(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shard(name).shape(name)

    def __contains__(self, name) -> bool:
        return name in self._weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._weight_map)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}

    def __enter__(self) -> "CheckpointDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<moe.safetensors.CheckpointDir {self.directory!r} ({len(self.files)} files, "
                f"{len(self)} tensors)>")


def open_checkpoint(directory, progress: Optional[Callable[[int, int, str], object]] = None
                    ) -> CheckpointDir:
    """Open a Hugging Face model directory (single file or sharded); see CheckpointDir."""
    return CheckpointDir(directory, progress)
