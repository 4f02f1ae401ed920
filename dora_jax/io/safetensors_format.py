"""A small, dependency-free reader and writer of the safetensors format.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length ``N``, ``N`` bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the byte
buffer that follows) plus an optional ``"__metadata__"`` ``{str: str}``, then
the buffer (row-major, little-endian). Files written here load with the
``safetensors`` library and with ``safetensors.torch`` (what Hugging Face PEFT
uses); bfloat16 is supported through ``ml_dtypes`` (a JAX dependency), which
``safetensors.numpy`` does not read.

The reader validates everything it can (header length and JSON, dtype names,
shapes against offsets, contiguous non-overlapping offsets covering the whole
buffer, file size) and raises :class:`SafetensorsError` naming the file and the
problem, so a truncated or corrupt file is never half-read.

The format has no checksum of its own, so a flipped bit in the tensor data
would load silently. :func:`encode` therefore stores one in the metadata,
where other readers (``safetensors``, PEFT) ignore it: ``"dora_jax.sha256"``,
the SHA-256 of the header (every tensor's name, dtype, shape and offsets, and
the other metadata, as canonical JSON) followed by the data buffer. :func:`decode`
verifies it when present; files without it (written by PEFT, ``safetensors``)
are read as before, unless they hold other ``dora_jax.`` metadata keys (a file
dora_jax wrote whose checksum key a flipped bit renamed: refused).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

#: safetensors dtype name -> numpy dtype (little-endian).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}

#: Refuse headers above this size (the reference implementation's limit).
MAX_HEADER_BYTES = 100_000_000
#: Metadata key of the checksum of the header and the data (see the module docstring).
CHECKSUM_KEY = "dora_jax.sha256"
#: Metadata key written beside the checksum, naming its algorithm. A file holding
#: any ``dora_jax.`` key other than the checksum must hold the checksum: a flipped
#: bit in the checksum's key name leaves this one, so the file is refused, not
#: read unverified.
CHECKSUM_ALGORITHM_KEY = "dora_jax.checksum"
_PREFIX = "dora_jax."


class SafetensorsError(ValueError):
  """A safetensors file is truncated, corrupt or not in the format."""


def dtype_name(dtype) -> str:
  """The safetensors name of a numpy/JAX dtype (``float32`` -> ``"F32"``)."""
  dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
  name = _NAMES.get(dt)
  if name is None:
    raise TypeError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors "
                    f"(supported: {', '.join(str(d) for d in DTYPES.values())})")
  return name


def checksum(index: Mapping[str, object], metadata: Mapping[str, str], data) -> str:
  """The hex SHA-256 of a header (``index``: ``{name: {dtype, shape, data_offsets}}``, and
  ``metadata`` without the checksum) and the data buffer."""
  header = {**index, "__metadata__": dict(metadata)}
  digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
  digest.update(data)
  return digest.hexdigest()


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *,
           with_checksum: bool = True) -> bytes:
  """The bytes of a safetensors file holding ``tensors`` (any shapes) and ``metadata``.

  Tensors are laid out in name order; the header is padded with spaces to a
  multiple of 8 bytes, as the reference writer does. With ``with_checksum``
  (the default) the metadata also holds :data:`CHECKSUM_KEY` (computed here: a
  value passed in ``metadata`` is dropped).
  """
  header: dict[str, object] = {}
  metadata = dict(metadata or {})
  bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
  if bad:
    raise TypeError(f"safetensors metadata must map str to str, got {bad!r}")
  metadata.pop(CHECKSUM_KEY, None)  # always recomputed
  metadata.pop(CHECKSUM_ALGORITHM_KEY, None)
  if not with_checksum and any(k.startswith(_PREFIX) for k in metadata):
    raise ValueError(f"metadata keys starting with {_PREFIX!r} need with_checksum=True (a reader "
                     f"refuses them without the checksum), got {sorted(metadata)}")
  chunks, offset = [], 0
  for name in sorted(tensors):
    if name == "__metadata__" or not isinstance(name, str) or not name:
      raise ValueError(f"invalid tensor name {name!r}")
    arr = np.asarray(tensors[name])
    kind = dtype_name(arr.dtype)
    data = np.ascontiguousarray(arr, dtype=DTYPES[kind]).tobytes()
    header[name] = {"dtype": kind, "shape": [int(d) for d in arr.shape],
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  body = b"".join(chunks)
  if with_checksum:
    metadata[CHECKSUM_ALGORITHM_KEY] = "sha256 of the header and the data"
    metadata[CHECKSUM_KEY] = checksum(header, metadata, body)
  if metadata:
    header = {"__metadata__": metadata, **header}
  head = json.dumps(header, separators=(",", ":")).encode("utf-8")
  head += b" " * (-len(head) % 8)
  return struct.pack("<Q", len(head)) + head + body


def decode(data: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, metadata)`` from the bytes of a safetensors file, fully validated.

  The arrays are copies (writable, independent of ``data``). A checksum
  (:data:`CHECKSUM_KEY`) is verified and not returned in the metadata.

  Raises:
    SafetensorsError: naming ``source`` and what is wrong.
  """
  def fail(msg: str) -> SafetensorsError:
    return SafetensorsError(f"{source}: not a valid safetensors file: {msg}")

  if len(data) < 8:
    raise fail(f"{len(data)} bytes, shorter than the 8-byte header length (truncated?)")
  (n,) = struct.unpack("<Q", data[:8])
  if n > MAX_HEADER_BYTES:
    raise fail(f"header length {n} is implausible (corrupt file?)")
  if 8 + n > len(data):
    raise fail(f"header of {n} bytes but the file has only {len(data) - 8} after the length "
               "(truncated?)")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise fail(f"header is not JSON ({err})") from None
  if not isinstance(header, dict):
    raise fail("header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise fail("__metadata__ must map strings to strings")
  buffer = memoryview(data)[8 + n:]
  spans, tensors = [], {}
  for name, info in header.items():
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
      raise fail(f"entry {name!r} must have exactly dtype, shape and data_offsets")
    kind, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if kind not in DTYPES:
      raise fail(f"tensor {name!r} has unknown dtype {kind!r}")
    if (not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise fail(f"tensor {name!r} has invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]):
      raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[kind].itemsize
    if end - begin != expected:
      raise fail(f"tensor {name!r} ({kind} {tuple(shape)}) needs {expected} bytes, its offsets "
                 f"span {end - begin}")
    spans.append((begin, end, name))
  spans.sort()
  position = 0
  for begin, end, name in spans:
    if begin != position:
      raise fail(f"tensor {name!r} starts at byte {begin}, expected {position} "
                 "(overlapping or non-contiguous data)")
    position = end
  if position != len(buffer):
    if position > len(buffer):
      raise fail(f"the tensors need {position} data bytes but the file holds {len(buffer)} "
                 "(truncated?)")
    raise fail(f"{len(buffer) - position} trailing bytes after the last tensor")
  expected_sum = metadata.pop(CHECKSUM_KEY, None)
  if expected_sum is None and any(k.startswith(_PREFIX) for k in metadata):
    raise SafetensorsError(f"{source}: corrupt file: its metadata has dora_jax keys "
                           f"({', '.join(sorted(k for k in metadata if k.startswith(_PREFIX)))}) "
                           f"but no checksum ({CHECKSUM_KEY})")
  if expected_sum is not None and checksum(header, metadata, buffer) != expected_sum:
    raise SafetensorsError(f"{source}: corrupt file: the tensor data or header does not match "
                           f"the checksum stored with it ({CHECKSUM_KEY})")
  metadata.pop(CHECKSUM_ALGORITHM_KEY, None)
  for begin, end, name in spans:
    kind, shape = header[name]["dtype"], header[name]["shape"]
    arr = np.frombuffer(buffer[begin:end], dtype=DTYPES[kind]).reshape(shape)
    tensors[name] = arr.copy()
  return tensors, dict(metadata)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, metadata)`` of the safetensors file at ``path`` (see :func:`decode`)."""
  with open(path, "rb") as f:
    data = f.read()
  return decode(data, source=os.fspath(path))
