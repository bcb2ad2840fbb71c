"""moe.safetensors: bitwise round trips for every dtype (BF16 / F8 as bits, empty tensors,
metadata), the file layout, read-only zero-copy views, compatibility with the official
`safetensors` package both ways (skipped when it is not installed; the torch parts also
need torch), every malformed-header case raising SafetensorsError with a message that
names the problem (truncations at every byte, random byte flips, the official reader
agreeing that they are malformed), and Hugging Face checkpoint directories (single file,
sharded with an index, missing shards, shard names escaping the directory).
"""
import json
import mmap
import os
import struct

import numpy as np
import pytest

from moe.safetensors import (DTYPES, MAX_HEADER_SIZE, CheckpointDir, SafeOpen,
                             SafetensorsError, load_file, open_checkpoint, safe_open, save_file)

try:
    import safetensors as st_official
    import safetensors.numpy as st_numpy
except ImportError:
    st_official = st_numpy = None
try:
    import torch
except ImportError:
    torch = None

needs_official = pytest.mark.skipif(st_official is None,
                                    reason="the official safetensors package is not installed")
needs_torch = pytest.mark.skipif(st_official is None or torch is None,
                                 reason="needs the official safetensors package and torch")


# ---- helpers -------------------------------------------------------------------------------

def T(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def write_raw(path, header, data=b"", length=None):
    """A file from a header (dict -> compact JSON, or raw bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def sample_tensors(rng):
    """One array of every NumPy dtype the format has, of assorted shapes (incl. empty, 0-d)."""
    def ints(dtype, shape):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": ints(np.int64, (4,)), "i32": ints(np.int32, (2, 2)), "i16": ints(np.int16, (5,)),
        "i8": ints(np.int8, (3, 3)), "u64": ints(np.uint64, (3,)), "u32": ints(np.uint32, (1, 4)),
        "u16": ints(np.uint16, (6,)), "u8": ints(np.uint8, (9,)),
        "bool": rng.random((4, 2)) < 0.5,
        "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0,), np.float32),
        "empty3d": np.zeros((3, 0, 2), np.int16),
        "nan_bits": np.array([0x7FC00001, 0xFF800000], np.uint32).view(np.float32),
    }


def bits_of(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes() if a.size else b""


def assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype.newbyteorder("<")
    assert bits_of(got) == bits_of(want)


def valid_file(tmp_path, rng, name="model.safetensors"):
    tensors = {"a": rng.standard_normal((2, 3)).astype(np.float32),
               "b": np.arange(5, dtype=np.int16), "c": np.array([True, False]),
               "d": np.zeros((0, 4), np.float64)}
    path = tmp_path / name
    save_file(tensors, path, metadata={"format": "np"})
    return path


def open_all(path):
    """Open `path` and read every tensor (what a loader does)."""
    with safe_open(path) as f:
        for name in f.keys():
            f.get(name)
        f.metadata()


# ---- round trips ---------------------------------------------------------------------------

def test_round_trip_every_dtype(tmp_path, rng):
    tensors = sample_tensors(rng)
    tensors["bf16"] = rng.integers(0, 2**16, size=(3, 4), dtype=np.uint16)
    tensors["e4m3"] = rng.integers(0, 256, size=(5,), dtype=np.uint8)
    tensors["e5m2"] = rng.integers(-128, 128, size=(2, 2), dtype=np.int8)
    tensors["e8m0"] = rng.integers(0, 256, size=(1,), dtype=np.uint8)
    tensors["bf16_empty"] = np.zeros((0, 3), np.uint16)
    dtypes = {"bf16": "BF16", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2", "e8m0": "F8_E8M0",
              "bf16_empty": "BF16", "f32": "F32"}
    meta = {"format": "pt", "note": "ünïcödé ✓", "empty": ""}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata=meta, dtypes=dtypes)

    with safe_open(path) as f:
        assert isinstance(f, SafeOpen) and f.keys() == sorted(tensors)
        assert f.metadata() == meta
        for name, want in tensors.items():
            got = f.get(name)
            assert f.shape(name) == want.shape
            if name in dtypes and dtypes[name] in ("BF16",):
                assert f.dtype(name) == "BF16" and got.dtype == np.uint16
            elif name in ("e4m3", "e5m2", "e8m0"):
                assert f.dtype(name) == dtypes[name] and got.dtype == np.uint8
            else:
                assert DTYPES[f.dtype(name)] == want.dtype.newbyteorder("<")
            assert got.shape == want.shape and bits_of(got) == bits_of(want)
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    assert bits_of(loaded["nan_bits"]) == bits_of(tensors["nan_bits"])


def test_no_tensors_and_no_metadata(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    # byte for byte what the reference implementation writes for an empty dict
    assert path.read_bytes() == b"\x08" + b"\x00" * 7 + b"{}" + b" " * 6
    with safe_open(path) as f:
        assert f.keys() == [] and f.metadata() == {} and len(f) == 0
    assert load_file(path) == {}
    # null metadata is accepted (the reference accepts it) and reads as {}
    write_raw(path, {"__metadata__": None})
    with safe_open(path) as f:
        assert f.metadata() == {}


def test_layout_matches_reference_rules(tmp_path, rng):
    tensors = {"z8": np.zeros(3, np.int8), "a16": np.ones(3, np.float16),
               "m64": np.ones(1, np.float64), "b32": np.ones(3, np.float32),
               "a64": np.ones(2, np.int64), "e": np.zeros(0, np.float32)}
    path = tmp_path / "layout.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    text = raw[8:8 + n].decode()
    assert text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
    header = json.loads(text)
    assert list(header)[0] == "__metadata__"
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    # descending element size, then name; contiguous from 0 to the end of the file
    assert [k for k, _ in entries] == ["a64", "m64", "b32", "e", "a16", "z8"]
    pos = 0
    for name, info in entries:
        begin, end = info["data_offsets"]
        assert begin == pos and begin % tensors[name].itemsize == 0
        pos = end
    assert 8 + n + pos == len(raw)


def test_big_endian_and_non_contiguous_input(tmp_path, rng):
    a = rng.standard_normal((4, 6))
    tensors = {"be": a.astype(">f4"), "strided": a[:, ::2], "fortran": np.asfortranarray(a),
               "be_i": np.arange(6, dtype=">i2").reshape(2, 3)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    got = load_file(path)
    assert got["be"].dtype == np.dtype("<f4") and np.array_equal(got["be"], a.astype(np.float32))
    assert np.array_equal(got["strided"], a[:, ::2]) and got["strided"].flags.c_contiguous
    assert np.array_equal(got["fortran"], a)
    assert got["be_i"].dtype == np.dtype("<i2") and got["be_i"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_save_file_rejects_bad_arguments(tmp_path):
    path = tmp_path / "x.safetensors"
    f32 = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="names must be str"):
        save_file({1: f32}, path)
    with pytest.raises(ValueError, match="reserved"):
        save_file({"__metadata__": f32}, path)
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        save_file({"o": np.array([object()])}, path)
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        save_file({"c": np.ones(2, np.complex128)}, path)
    with pytest.raises(ValueError, match="BF16 needs an array of 2-byte integers"):
        save_file({"w": f32}, path, dtypes={"w": "BF16"})
    with pytest.raises(ValueError, match="only BF16"):
        save_file({"w": f32}, path, dtypes={"w": "F16"})
    with pytest.raises(ValueError, match="not among the tensors"):
        save_file({"w": f32}, path, dtypes={"v": "BF16"})
    with pytest.raises(TypeError, match="metadata"):
        save_file({"w": f32}, path, metadata={"k": 1})
    with pytest.raises(TypeError, match="mapping"):
        save_file([f32], path)
    assert not path.exists() and os.listdir(tmp_path) == []  # no temporary left behind


# ---- zero-copy, read-only views ------------------------------------------------------------

def _root_base(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def test_views_are_read_only_and_zero_copy(tmp_path, rng):
    path = valid_file(tmp_path, rng)
    f = safe_open(path)
    a = f.get("a")
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    with pytest.raises(ValueError):
        a.flags.writeable = True
    assert isinstance(_root_base(a), mmap.mmap)
    assert np.shares_memory(a, f._data)
    whole = np.frombuffer(path.read_bytes(), np.uint8)
    start = a.__array_interface__["data"][0] - f._data.__array_interface__["data"][0]
    assert whole[start:start + a.nbytes].tobytes() == a.tobytes()
    empty = f.get("d")
    assert empty.shape == (0, 4) and not empty.flags.writeable
    f.close()
    # views outlive close(); get() after close is refused
    assert a.shape == (2, 3) and np.isfinite(a).all()
    with pytest.raises(ValueError, match="closed"):
        f.get("a")
    # load_file's arrays too are views of one mapping, not copies
    loaded = load_file(path)
    roots = {id(_root_base(v)) for v in loaded.values()}
    assert len(roots) == 1 and isinstance(_root_base(loaded["b"]), mmap.mmap)
    assert not any(v.flags.writeable or v.flags.owndata for v in loaded.values())
    # closing with no views alive releases the mapping
    with safe_open(path) as g:
        g.keys()
    assert g._mmap is None


def test_saving_over_a_loaded_file_keeps_its_views(tmp_path, rng):
    path = valid_file(tmp_path, rng)
    before = load_file(path)
    copy = {k: np.array(v) for k, v in before.items()}
    save_file({k: v * 2 if v.dtype.kind == "f" else v for k, v in before.items()}, path)
    for k in before:  # the old mapping is untouched: the new file was renamed over it
        assert bits_of(before[k]) == bits_of(copy[k])
    assert np.array_equal(load_file(path)["a"], 2 * copy["a"])


def test_bool_bytes_other_than_0_and_1(tmp_path):
    path = write_raw(tmp_path / "b.safetensors", {"m": T("BOOL", [3], [0, 3])}, b"\x00\x01\x02")
    with safe_open(path) as f:
        with pytest.raises(SafetensorsError, match=r"'m' \(BOOL\) holds bytes other than 0"):
            f.get("m")


def test_unaligned_data_buffer_still_reads(tmp_path):
    # a header whose length is not a multiple of 8 (valid, written by other tools)
    header = json.dumps({"w": T("F32", [2], [0, 8])}).encode()
    header += b" " * ((1 - len(header)) % 8)
    path = write_raw(tmp_path / "u.safetensors", header, np.array([1.5, -2], "<f4").tobytes())
    w = load_file(path)["w"]
    assert w.tolist() == [1.5, -2.0] and not w.flags.aligned


# ---- the official package ------------------------------------------------------------------

@needs_official
def test_official_reads_what_we_write(tmp_path, rng):
    tensors = sample_tensors(rng)
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"format": "np"})
    got = st_numpy.load_file(str(path))
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        assert_same(got[name], want)
    with st_official.safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "np"}


@needs_official
def test_we_read_what_official_writes(tmp_path, rng):
    tensors = sample_tensors(rng)
    path = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(path), metadata={"format": "np", "x": "y"})
    with safe_open(path) as f:
        assert f.metadata() == {"format": "np", "x": "y"}
        for name, want in tensors.items():
            assert_same(f.get(name), want)
    # and an empty file
    st_numpy.save_file({}, str(path))
    assert load_file(path) == {}


@needs_torch
def test_torch_bf16_and_f8_both_ways(tmp_path):
    import safetensors.torch as st_torch
    g = torch.Generator().manual_seed(0)
    theirs = {"w_bf16": torch.randn(4, 8, generator=g).to(torch.bfloat16),
              "e_bf16": torch.zeros(0, 3, dtype=torch.bfloat16),
              "w_f32": torch.randn(3, generator=g)}
    f8 = {"F8_E4M3": getattr(torch, "float8_e4m3fn", None),
          "F8_E5M2": getattr(torch, "float8_e5m2", None)}
    for code, dt in f8.items():
        if dt is not None:
            theirs["w_" + code] = torch.randn(5, generator=g).to(dt)
    path = tmp_path / "torch.safetensors"
    st_torch.save_file(theirs, str(path), metadata={"format": "pt"})
    with safe_open(path) as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in theirs.items():
            got = f.get(name)
            if t.dtype == torch.bfloat16:
                assert f.dtype(name) == "BF16" and got.dtype == np.uint16
                assert np.array_equal(got, t.view(torch.int16).numpy().view(np.uint16))
            elif t.dtype in f8.values():
                assert f.dtype(name) == name[2:] and got.dtype == np.uint8
                assert np.array_equal(got, t.view(torch.uint8).numpy())
            else:
                assert np.array_equal(got, t.numpy())

    # ours -> torch: uint16 bits written as BF16 come back as the same bfloat16 tensor
    ours = {name: np.array(load_file(path)[name]) for name in theirs}
    dtypes = {name: ("BF16" if t.dtype == torch.bfloat16 else name[2:] if t.dtype in f8.values()
                     else "F32") for name, t in theirs.items()}
    path2 = tmp_path / "ours.safetensors"
    save_file(ours, path2, dtypes=dtypes)
    back = st_torch.load_file(str(path2))
    for name, t in theirs.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].view(torch.uint8), t.view(torch.uint8))


# ---- malformed files -----------------------------------------------------------------------

HUGE = 2**64 - 1
OK_ENTRY = T("U8", [4], [0, 4])

# (id, header dict or raw header bytes, data, header length override or None, message regex)
MALFORMED = [
    ("non_utf8", b'{"a\xff": 1}', b"", None, "not valid UTF-8"),
    ("invalid_json", b'{"a": ', b"", None, "not valid JSON"),
    ("trailing_garbage", b'{}  x', b"", None, "not valid JSON"),
    ("nul_padding", b'{}\x00\x00', b"", None, "not valid JSON"),
    ("empty_header", b"", b"", None, "not valid JSON"),
    ("nan", b'{"__metadata__": {"a": NaN}}', b"", None, "not valid JSON"),
    ("huge_int", b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
     b"", None, "not valid JSON"),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000, b"", None, "JSON"),
    ("json_array", b"[]", b"", None, "must be a JSON object, got an array"),
    ("json_number", b"1", b"", None, "must be a JSON object, got an integer"),
    ("json_string", b'"x"', b"", None, "must be a JSON object, got a string"),
    ("json_null", b"null", b"", None, "must be a JSON object, got null"),
    ("duplicate_name", b'{"w": ' + json.dumps(OK_ENTRY).encode() + b', "w": '
     + json.dumps(OK_ENTRY).encode() + b"}", b"abcd", None, "key 'w' more than once"),
    ("duplicate_field", b'{"w": {"dtype": "U8", "dtype": "I8", "shape": [4], '
     b'"data_offsets": [0, 4]}}', b"abcd", None, "key 'dtype' more than once"),
    ("entry_not_object", {"w": [1, 2]}, b"", None, "tensor 'w': expected an object"),
    ("unknown_field", {"w": {**OK_ENTRY, "extra": 1}}, b"abcd", None,
     "tensor 'w' has the unknown field 'extra'"),
    ("stray_objects", {"__metadata__": {}, **{f"t{i}": {} for i in range(1001)}}, b"", None,
     "more than 1000 objects that are not tensor entries"),
    ("missing_dtype", {"w": {"shape": [4], "data_offsets": [0, 4]}}, b"abcd", None,
     "tensor 'w' has no 'dtype'"),
    ("missing_offsets", {"w": {"dtype": "U8", "shape": [4]}}, b"abcd", None,
     "tensor 'w' has no 'data_offsets'"),
    ("unknown_dtype", {"w": T("F99", [4], [0, 4])}, b"abcd", None,
     "unknown or unsupported dtype 'F99'"),
    ("lowercase_dtype", {"w": T("f32", [1], [0, 4])}, b"abcd", None, "unsupported dtype 'f32'"),
    ("subbyte_dtype", {"w": T("F4", [8], [0, 4])}, b"abcd", None, "unsupported dtype 'F4'"),
    ("dtype_not_str", {"w": T(4, [4], [0, 4])}, b"abcd", None, "dtype must be a string"),
    ("shape_not_list", {"w": T("U8", 4, [0, 4])}, b"abcd", None, "shape must be a list"),
    ("shape_negative", {"w": T("U8", [-4], [0, 4])}, b"abcd", None,
     "shape must be a list of non-neg"),
    ("shape_float", {"w": T("U8", [4.0], [0, 4])}, b"abcd", None, "shape must be a list"),
    ("shape_bool", {"w": T("U8", [True], [0, 1])}, b"a", None, "shape must be a list"),
    ("shape_too_many_dims", {"w": T("U8", [1] * 65, [0, 1])}, b"a", None, "65 dimensions"),
    ("shape_too_large_for_numpy", {"w": T("U8", [0, 2**63], [0, 0])}, b"", None,
     "too large for NumPy"),
    ("offsets_one_int", {"w": T("U8", [4], [4])}, b"abcd", None, "data_offsets must be two"),
    ("offsets_three_ints", {"w": T("U8", [4], [0, 4, 4])}, b"abcd", None,
     "data_offsets must be two"),
    ("offsets_float", {"w": T("U8", [4], [0.0, 4])}, b"abcd", None, "data_offsets must be two"),
    ("offsets_negative", {"w": T("U8", [0], [-1, -1])}, b"", None,
     "data_offsets must be two non-neg"),
    ("offsets_string", {"w": T("U8", [4], "0,4")}, b"abcd", None, "data_offsets must be two"),
    ("offsets_reversed", {"w": T("U8", [0], [4, 0])}, b"abcd", None,
     r"\[4, 0\] with end before begin"),
    ("size_mismatch", {"w": T("F32", [2], [0, 4])}, b"abcd", None,
     r"'w' \(F32, shape \[2\]\) needs 8 bytes but its data_offsets \[0, 4\] span 4"),
    ("size_overflow", {"w": T("F64", [2**62, 2**62], [0, 8])}, b"abcdefgh", None, "needs"),
    ("size_astronomical", {"w": T("U8", [10**4000] * 4, [0, 0])}, b"", None,
     r"needs about 10\*\*16000 bytes"),
    ("past_the_end", {"w": T("U8", [100], [0, 100])}, b"x" * 96, None,
     r"tensor 'w' has data_offsets \[0, 100\] past the end of the data \(96 bytes\)"),
    ("offsets_huge", {"w": T("U8", [0], [2**70, 2**70])}, b"", None, "past the end"),
    ("overlap", {"a": T("U8", [4], [0, 4]), "b": T("U8", [4], [2, 6])}, b"abcdef", None,
     r"tensor 'b' \(data_offsets \[2, 6\]\) overlaps tensor 'a' \(data_offsets \[0, 4\]\)"),
    ("same_offsets", {"a": T("U8", [4], [0, 4]), "b": T("U8", [4], [0, 4])}, b"abcd", None,
     "overlaps"),
    ("empty_inside_another", {"a": T("U8", [4], [0, 4]), "e": T("U8", [0], [2, 2])}, b"abcd",
     None, "tensor 'e' .* overlaps tensor 'a'"),
    ("gap", {"a": T("U8", [2], [0, 2]), "b": T("U8", [1], [3, 4])}, b"abcd", None,
     r"gap in the data: bytes \[2, 3\) before tensor 'b'"),
    ("gap_at_start", {"a": T("U8", [3], [1, 4])}, b"abcd", None, r"bytes \[0, 1\)"),
    ("trailing_bytes", {"a": T("U8", [4], [0, 4])}, b"abcde", None, "1 trailing bytes"),
    ("data_but_no_tensors", {}, b"abcd", None, "4 trailing bytes"),
    ("metadata_not_object", {"__metadata__": ["a"]}, b"", None, "__metadata__ must be an object"),
    ("metadata_int_value", {"__metadata__": {"k": 1}}, b"", None,
     "__metadata__ must map strings to strings, but 'k' is an integer"),
    ("metadata_nested", {"__metadata__": {"k": {"x": "y"}}}, b"", None, "'k' is an object"),
    ("header_len_max_u64", {}, b"", HUGE, "header length 18446744073709551615 is absurd"),
    ("header_len_absurd", {}, b"", MAX_HEADER_SIZE + 1, "absurd"),
    ("header_len_2_63", {}, b"", 2**63, "absurd"),
    ("header_len_past_eof", {}, b"", 1000, r"header length 1000 runs past the end of the file"),
    ("header_len_one_past_eof", b"{}", b"", 3,
     r"header length 3 runs past the end of the file \(10 bytes\)"),
]


@pytest.mark.parametrize("header,data,length,message",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_header(tmp_path, header, data, length, message):
    path = tmp_path / "model.safetensors"
    write_raw(path, header, data, length)
    with pytest.raises(SafetensorsError, match=message) as info:
        safe_open(path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, ValueError)
    with pytest.raises(SafetensorsError):
        load_file(path)


# where this reader is deliberately stricter than the reference implementation
STRICTER = ("duplicate_name", "unknown_field", "shape_too_many_dims",
            "shape_too_large_for_numpy", "subbyte_dtype")


@needs_official
@pytest.mark.parametrize("header,data,length,message",
                         [case[1:] for case in MALFORMED if case[0] not in STRICTER],
                         ids=[case[0] for case in MALFORMED if case[0] not in STRICTER])
def test_official_also_rejects(tmp_path, header, data, length, message):
    """The cases above are malformed for the reference implementation too (except where this
    reader is deliberately stricter: duplicate names, unknown fields, NumPy's limits, F4)."""
    path = tmp_path / "model.safetensors"
    write_raw(path, header, data, length)
    with pytest.raises(Exception):
        with st_official.safe_open(str(path), "np") as f:
            for name in f.keys():
                f.get_tensor(name)


@pytest.mark.parametrize("case", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_structure_guard_never_accepts_less(tmp_path, monkeypatch, case):
    """With the pre-parse structure check forced on for every header size, every malformed
    case still raises SafetensorsError (maybe worded by the check)."""
    import moe.safetensors as mst
    monkeypatch.setattr(mst, "_GUARD_ABOVE", -1)
    path = write_raw(tmp_path / "model.safetensors", *case[1:4])
    with pytest.raises(SafetensorsError):
        safe_open(path)


TRICKY = ['q"uote', 'back\\slash\\', '\\"', 'br{ack[ets]}', 'comma,colon:', "ünï ✓",
          'esc\u0000\n\t', '"', "", " "]


def test_structure_guard_accepts_valid_headers(tmp_path, monkeypatch, rng):
    import moe.safetensors as mst
    monkeypatch.setattr(mst, "_GUARD_ABOVE", -1)
    tensors = sample_tensors(rng)
    tensors.update({name: np.arange(i + 1, dtype=np.int32) for i, name in enumerate(TRICKY)})
    meta = {name: name + '}]"\\' for name in TRICKY}
    path = tmp_path / "tricky.safetensors"
    save_file(tensors, path, metadata=meta)
    with safe_open(path) as f:
        assert f.metadata() == meta and f.keys() == sorted(tensors)
        for name, want in tensors.items():
            assert_same(f.get(name), want)


def big_header_file(path, body):
    assert len(body) > 1 << 20  # the structure check's threshold
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


@pytest.mark.parametrize("body,message", [
    (b'{"a":[' + b"{}," * 500_000 + b"{}]}", "an array where a tensor entry"),
    (b"[" + b"[]," * 500_000 + b"[]]", "must be a JSON object, got an array"),
    (b'{"a":{"b":' + b"[" * 700_000 + b"]" * 700_000 + b"}}", "nests containers deeper"),
    (b'{"a":{"b":{' + b'"c":1,' * 300_000 + b'"d":1}}}', "an object inside a tensor entry"),
    (b'{"a":{' + b"".join(b'"%d":[],' % i for i in range(200_000)) + b'"x":[]}}',
     "200001 lists"),
    (b"{" + b"".join(b'"%d":1,' % i for i in range(200_000)) + b'"x":1}',
     "200001 top-level members"),
    (b'{"w":{"dtype":"U8","shape":[' + b"0," * 700_000 + b'0],"data_offsets":[0,0]}}',
     "700003 list items"),
    (b"{" + b"".join(b'"%d":{},' % i for i in range(200_000)) + b'"x":{}}',
     "more than 1000 objects that are not tensor entries"),
], ids=["list_of_objects", "list_of_lists", "deep", "object_in_entry", "lists_in_entry",
        "scalars", "long_shape", "empty_entries"])
def test_large_adversarial_headers_fail_early(tmp_path, body, message):
    """Headers over 1 MiB get a vectorized bracket check before json.loads (which would
    build every container first); these are rejected by it, or by the parse hook."""
    with pytest.raises(SafetensorsError, match=message):
        safe_open(big_header_file(tmp_path / "big.safetensors", body))


def test_large_valid_header(tmp_path):
    names = [f"model.layers.{i}.mlp.experts.{TRICKY[i % len(TRICKY)]}.weight" + "x" * 40
             for i in range(14_000)]
    tensors = {name: np.full(i % 3, i, np.int16) for i, name in enumerate(names)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, path, metadata={"k": "v" * 1000})
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] > 1 << 20
    with safe_open(path) as f:
        assert len(f) == len(names) and f.metadata() == {"k": "v" * 1000}
        for i in range(0, len(names), 997):
            assert f.get(names[i]).tolist() == [i] * (i % 3)


@pytest.mark.parametrize("content,message", [(b"", "file is empty"),
                                             (b"\x08\x00\x00", "file is 3 bytes, too short"),
                                             (b"\x00" * 7, "7 bytes")])
def test_short_files(tmp_path, content, message):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match=message):
        safe_open(path)


def test_every_truncation_is_rejected(tmp_path, rng):
    path = valid_file(tmp_path, rng)
    raw = path.read_bytes()
    open_all(path)
    cut = tmp_path / "cut.safetensors"
    for n in range(len(raw)):
        cut.write_bytes(raw[:n])
        with pytest.raises(SafetensorsError):
            safe_open(cut)
        if st_official is not None:  # the reference agrees
            with pytest.raises(Exception):
                st_official.safe_open(str(cut), "np")
    cut.write_bytes(raw + b"\x00")
    with pytest.raises(SafetensorsError, match="trailing"):
        safe_open(cut)


def test_random_corruption_raises_only_safetensors_error(tmp_path, rng):
    """Byte flips, header-length edits and splices: each file either opens and reads
    completely or raises SafetensorsError; nothing else escapes."""
    raw = valid_file(tmp_path, rng).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path = tmp_path / "fuzz.safetensors"
    opened = rejected = 0
    for i in range(600):
        buf = bytearray(raw)
        kind = i % 4
        if kind == 0:  # flip bytes of the header
            for pos in rng.integers(0, 8 + n, size=int(rng.integers(1, 4))):
                buf[pos] = int(rng.integers(0, 256))
        elif kind == 1:  # a printable byte into the JSON (digits, brackets, quotes)
            buf[int(rng.integers(8, 8 + n))] = ord(rng.choice(list('0123456789[]{}",: -.e')))
        elif kind == 2:  # a random header length
            buf[:8] = struct.pack("<Q", int(rng.integers(0, 2**63)) >> int(rng.integers(0, 63)))
        else:  # delete or duplicate a slice
            a, b = sorted(rng.integers(0, len(buf), size=2))
            buf = buf[:a] + buf[b:] if i % 8 == 3 else buf[:b] + buf[a:]
        path.write_bytes(bytes(buf))
        try:
            open_all(path)
            opened += 1
        except SafetensorsError:
            rejected += 1
    assert rejected > 300


def test_io_errors_stay_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        safe_open(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError):
        safe_open(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SafetensorsError, match="not a regular file"):
        safe_open(fifo)


def test_unknown_tensor_is_key_error(tmp_path, rng):
    with safe_open(valid_file(tmp_path, rng)) as f:
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            f.get("nope")
        with pytest.raises(KeyError):
            f.dtype("nope")
        assert "a" in f and "nope" not in f


def test_framework_argument(tmp_path, rng):
    path = valid_file(tmp_path, rng)
    with safe_open(path, "np") as f:
        assert f.get_tensor("b").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="framework"):
        safe_open(path, "pt")


# ---- checkpoint directories ----------------------------------------------------------------

def make_sharded(tmp_path, rng, weight_map=None):
    d = tmp_path / "ckpt"
    d.mkdir()
    shards = {"model-00001-of-00002.safetensors": {"embed": rng.standard_normal((4, 3)),
                                                   "layer.0.w": np.arange(6, dtype=np.int32)},
              "model-00002-of-00002.safetensors": {"layer.1.w": np.ones((2, 2), np.float16),
                                                   "lm_head": np.zeros((0,), np.float32)}}
    for fn, tensors in shards.items():
        save_file(tensors, d / fn)
    if weight_map is None:
        weight_map = {name: fn for fn, tensors in shards.items() for name in tensors}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return d, shards


def test_sharded_checkpoint(tmp_path, rng):
    d, shards = make_sharded(tmp_path, rng)
    calls = []
    with open_checkpoint(d, progress=lambda *a: calls.append(a)) as ckpt:
        assert isinstance(ckpt, CheckpointDir)
        assert calls == [(1, 2, "model-00001-of-00002.safetensors"),
                         (2, 2, "model-00002-of-00002.safetensors")]
        assert ckpt.keys() == sorted(n for t in shards.values() for n in t) and len(ckpt) == 4
        for fn, tensors in shards.items():
            for name, want in tensors.items():
                got = ckpt.get(name)
                assert_same(got, want) and not got.flags.writeable
                assert ckpt.file_of(name) == fn and ckpt.shape(name) == want.shape
        assert ckpt.dtype("layer.1.w") == "F16"
        with pytest.raises(KeyError):
            ckpt.get("nope")
    with pytest.raises(ValueError, match="closed"):
        ckpt.get("embed")


def test_single_file_checkpoint(tmp_path, rng):
    d = tmp_path / "single"
    d.mkdir()
    valid_file(d, rng)
    calls = []
    with CheckpointDir(d, progress=lambda *a: calls.append(a)) as ckpt:
        assert calls == [(1, 1, "model.safetensors")] and ckpt.files == ["model.safetensors"]
        assert ckpt.keys() == ["a", "b", "c", "d"]
        assert ckpt.get("b").tolist() == [0, 1, 2, 3, 4]
    # the single file wins over an index (as in transformers)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"x": "missing.safetensors"}}')
    with open_checkpoint(d) as ckpt:
        assert ckpt.keys() == ["a", "b", "c", "d"]


def test_checkpoint_missing_shard(tmp_path, rng):
    d, _ = make_sharded(tmp_path, rng)
    os.remove(d / "model-00002-of-00002.safetensors")
    calls = []
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(d, progress=lambda *a: calls.append(a))
    assert calls == []  # checked before any shard is opened


@pytest.mark.parametrize("bad", ["../x.safetensors", "sub/../../x.safetensors",
                                 "..\\x.safetensors", "/abs/x.safetensors",
                                 "C:\\x.safetensors", "", "a\0b"])
def test_checkpoint_shard_escaping_the_directory(tmp_path, rng, bad):
    d, _ = make_sharded(tmp_path, rng, weight_map={"embed": "model-00001-of-00002.safetensors",
                                                   "evil": bad})
    save_file({"evil": np.ones(1)}, tmp_path / "x.safetensors")  # exists, must not be read
    with pytest.raises(SafetensorsError, match="model.safetensors.index.json: shard file name"):
        open_checkpoint(d)


@pytest.mark.parametrize("index,message", [
    ("{", "index is not valid JSON"),
    ("[]", "index must be a JSON object"),
    ('{"weight_map": []}', "needs a 'weight_map' object"),
    ('{"metadata": {}}', "needs a 'weight_map' object"),
    ('{"weight_map": {"a": 3}}', "non-empty strings"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "key 'a' more than once"),
    ('{"weight_map": {"nope": "model-00001-of-00002.safetensors"}}', "'nope' in "
     "'model-00001-of-00002.safetensors', which has no such tensor"),
])
def test_checkpoint_bad_index(tmp_path, rng, index, message):
    d, _ = make_sharded(tmp_path, rng)
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(SafetensorsError, match=message):
        open_checkpoint(d)


def test_checkpoint_bad_shard_and_empty_dir(tmp_path, rng):
    d, _ = make_sharded(tmp_path, rng)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"\x01" * 20)
    with pytest.raises(SafetensorsError, match="model-00002-of-00002.safetensors: header length"):
        open_checkpoint(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        open_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        open_checkpoint(tmp_path / "nowhere")
