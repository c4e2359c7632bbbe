"""What a GGUF file's header says: its key/values and the bytes of each tensor.

Read without llama.cpp (the router never loads a model), to estimate what an instance
will cost in RAM and VRAM before it is started.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from typing import IO, Any

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
    7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_LAYER = re.compile(r"blk\.(\d+)\.")
_DEFAULT_ALIGNMENT = 32


class GGUFError(ValueError):
    """The file is not a GGUF we can read the header of."""


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF's scalar and string key/values (an array's length as `<key>#count`) and each
    tensor's bytes in the file."""

    meta: dict[str, Any]
    tensors: dict[str, int]

    def layer_bytes(self) -> dict[int, int]:
        """Bytes of the weights of each repeating layer (`blk.<i>.*`), by layer index."""
        out: dict[int, int] = {}
        for name, size in self.tensors.items():
            m = _LAYER.match(name)
            if m:
                out[int(m.group(1))] = out.get(int(m.group(1)), 0) + size
        return out

    def output_bytes(self) -> int:
        """The output layer's weights; a model without its own output matrix reuses
        (and llama.cpp copies, where it offloads the output layer) the token embeddings."""
        size = self.tensors.get("output.weight", self.tensors.get("token_embd.weight", 0))
        return size + self.tensors.get("output_norm.weight", 0)


def _read(fh: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise GGUFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_string(fh: IO[bytes]) -> str:
    n = _read(fh, "<Q")
    if n > 1 << 24:
        raise GGUFError("implausible string length in GGUF header")
    return fh.read(n).decode("utf-8", errors="replace")


def _skip_value(fh: IO[bytes], vtype: int) -> None:
    if vtype in _SCALARS:
        fh.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _STRING:
        fh.seek(_read(fh, "<Q"), os.SEEK_CUR)
    elif vtype == _ARRAY:
        etype, count = _read(fh, "<I"), _read(fh, "<Q")
        if etype in _SCALARS:
            fh.seek(struct.calcsize(_SCALARS[etype]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(fh, etype)
    else:
        raise GGUFError(f"unknown GGUF value type {vtype}")


def read_gguf(path: str, digests: frozenset[str] = frozenset()) -> GGUFHeader:
    """The header of the GGUF at `path`: key/values, then the tensors' sizes.

    Each array named in `digests` also gets its bytes' SHA-256 as `<key>#sha256`. A
    tensor's size is the distance from its data offset to the next one's (or to the
    end of the file): exact up to alignment padding, with no table of quantization types.
    """
    meta: dict[str, Any] = {}
    with open(path, "rb", buffering=1 << 16) as fh:
        if fh.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = _read(fh, "<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version}")
        n_tensors = _read(fh, "<Q")
        for _ in range(_read(fh, "<Q")):
            key = _read_string(fh)
            vtype = _read(fh, "<I")
            if vtype in _SCALARS:
                meta[key] = _read(fh, _SCALARS[vtype])
            elif vtype == _STRING:
                meta[key] = _read_string(fh)
            elif vtype == _ARRAY:
                start = fh.tell()
                _read(fh, "<I")  # element type
                meta[f"{key}#count"] = _read(fh, "<Q")
                fh.seek(start)
                _skip_value(fh, vtype)
                if key in digests:  # the array's bytes, hashed (a vocabulary: ~1 MiB)
                    end = fh.tell()
                    fh.seek(start)
                    meta[f"{key}#sha256"] = hashlib.sha256(fh.read(end - start)).hexdigest()
            else:
                _skip_value(fh, vtype)
        offsets: list[tuple[int, str]] = []
        for _ in range(n_tensors):
            name = _read_string(fh)
            fh.seek(8 * _read(fh, "<I"), os.SEEK_CUR)  # the dimensions
            _read(fh, "<I")  # the type
            offsets.append((_read(fh, "<Q"), name))
        align = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT)) or _DEFAULT_ALIGNMENT
        data_start = -(-fh.tell() // align) * align
        file_size = os.fstat(fh.fileno()).st_size
    offsets.sort()
    ends = [offset for offset, _ in offsets[1:]] + [max(0, file_size - data_start)]
    tensors = {
        name: max(0, end - offset) for (offset, name), end in zip(offsets, ends, strict=True)
    }
    return GGUFHeader(meta=meta, tensors=tensors)


def read_gguf_scalars(path: str) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header; an array's length as `<key>#count`."""
    return read_gguf(path).meta


# What makes two vocabularies the same for speculative decoding (llama.cpp's
# common_speculative_are_compatible): the tokenizer, every token's text and type, the
# special tokens and whether BOS/EOS are added.
_VOCAB_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"})
_VOCAB_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens#count",
    "tokenizer.ggml.tokens#sha256",
    "tokenizer.ggml.token_type#sha256",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
)


def vocab_mismatch(path: str, other: str) -> str | None:
    """Why the GGUFs at `path` and `other` do not share a vocabulary, or None if they do."""
    a, b = read_gguf(path, _VOCAB_ARRAYS).meta, read_gguf(other, _VOCAB_ARRAYS).meta
    for key in _VOCAB_KEYS:
        if a.get(key) != b.get(key):
            name = key.removeprefix("tokenizer.ggml.").replace("#count", " (count)")
            if key.endswith("#sha256"):
                return f"the {name.removesuffix('#sha256')} differ"
            return f"{name} is {b.get(key)!r}, the model's is {a.get(key)!r}"
    return None
