"""A random-weight f16 GGUF of a real model's shape, written where no weights can be fetched.

Throughput depends on shapes, not on weight values, so a Llama-3.2-1B-shaped model with
random weights measures what the real one would. The vocabulary is a byte-fallback
SentencePiece one (as tests/tinymodel.py's) padded with filler pieces to the real size,
with ChatML control tokens, so chat templates, EOG suppression and logits cost the same.
Tensors are streamed to the file one at a time (the 1B model is 2.5 GB).

    python -m benchmarks.gpu.model --out /tmp/llama-1b-f16.gguf
"""

from __future__ import annotations

import argparse
import pathlib
import time
from dataclasses import dataclass

import gguf
import numpy as np

_CONTROL = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
_PIECES = ("▁",) + tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """A llama-architecture model's dimensions (Llama-3.2-1B's by default, tied embeddings)."""

    n_vocab: int = 128256
    n_embd: int = 2048
    n_layer: int = 16
    n_head: int = 32
    n_head_kv: int = 8
    n_ff: int = 8192
    n_ctx_train: int = 8192


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    fixed = len(_CONTROL) + len(_BYTES) + len(_PIECES)
    if n_vocab < fixed:
        raise ValueError(f"n_vocab must be at least {fixed}")
    filler = [f"▁w{i}" for i in range(n_vocab - fixed)]
    tokens = [*_CONTROL, *_BYTES, *_PIECES, *filler]
    scores = [0.0] * (len(_CONTROL) + len(_BYTES)) + [-float(i) for i in range(len(_PIECES))]
    scores += [-1000.0 - i for i in range(len(filler))]
    types = (
        [gguf.TokenType.UNKNOWN]
        + [gguf.TokenType.CONTROL] * (len(_CONTROL) - 1)
        + [gguf.TokenType.BYTE] * len(_BYTES)
        + [gguf.TokenType.NORMAL] * (len(_PIECES) + len(filler))
    )
    return tokens, scores, types


def _tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in file order; GGUF stores numpy's (rows, cols) reversed."""
    head_dim = s.n_embd // s.n_head
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.n_vocab, s.n_embd))]
    for i in range(s.n_layer):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (s.n_embd,)),
            (f"blk.{i}.attn_q.weight", (s.n_head * head_dim, s.n_embd)),
            (f"blk.{i}.attn_k.weight", (s.n_head_kv * head_dim, s.n_embd)),
            (f"blk.{i}.attn_v.weight", (s.n_head_kv * head_dim, s.n_embd)),
            (f"blk.{i}.attn_output.weight", (s.n_embd, s.n_head * head_dim)),
            (f"blk.{i}.ffn_norm.weight", (s.n_embd,)),
            (f"blk.{i}.ffn_gate.weight", (s.n_ff, s.n_embd)),
            (f"blk.{i}.ffn_up.weight", (s.n_ff, s.n_embd)),
            (f"blk.{i}.ffn_down.weight", (s.n_embd, s.n_ff)),
        ]
    shapes.append(("output_norm.weight", (s.n_embd,)))  # output tied to token_embd, as 1B's
    return shapes


def write_model(path: pathlib.Path, shape: Shape = Shape(), *, seed: int = 0) -> pathlib.Path:
    """Write the model to `path`: f16 matrices, f32 norms (as llama.cpp's converters do)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("random-llama-shape")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(500000.0)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.n_vocab)
    tokens, scores, types = _vocab(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    shapes = _tensor_shapes(shape)
    for name, dims in shapes:
        dtype = np.float32 if len(dims) == 1 else np.float16
        nbytes = int(np.prod(dims)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(name, dims, np.dtype(dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # One block of random values, repeated: generating 1.2 billion would take minutes.
    block = (np.random.default_rng(seed).standard_normal(1 << 22) * 0.02).astype(np.float16)
    for _, dims in shapes:
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            writer.write_tensor_data(np.resize(block, dims))
    writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    for field, default in Shape().__dict__.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args(argv)
    shape = Shape(**{f: getattr(args, f) for f in Shape().__dict__})
    t0 = time.perf_counter()
    write_model(args.out, shape)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
