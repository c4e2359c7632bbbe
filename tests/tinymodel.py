"""A tiny random-weight llama GGUF for tests: real llama.cpp code paths, millisecond loads."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX_TRAIN = 4096
RMS_EPS = 1e-5

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
IM_START_ID = 3
IM_END_ID = 4
_CONTROL = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
_PIECES = ("▁",) + tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
TOKENS = _CONTROL + _BYTES + _PIECES
N_VOCAB = len(TOKENS)

# SmolLM2's template with a shorter default system prompt. It must not equal
# llama_cpp's CHATML_CHAT_TEMPLATE, or Llama would pick its built-in "chatml" format
# instead of building a Jinja2ChatFormatter from this metadata.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_types() -> list[int]:
    return (
        [gguf.TokenType.UNKNOWN]
        + [gguf.TokenType.CONTROL] * (len(_CONTROL) - 1)
        + [gguf.TokenType.BYTE] * len(_BYTES)
        + [gguf.TokenType.NORMAL] * len(_PIECES)
    )


def _token_scores() -> list[float]:
    return [0.0] * (len(_CONTROL) + len(_BYTES)) + [-float(i) for i in range(len(_PIECES))]


def _suppressed_ids() -> list[int]:
    """Tokens the model never samples: control tokens and bytes outside printable ASCII."""
    printable = range(0x20, 0x7F)
    byte_ids = [len(_CONTROL) + b for b in range(256) if b not in printable]
    return list(range(len(_CONTROL))) + byte_ids


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    head_dim = N_EMBD // N_HEAD
    # Every embedding carries a constant 1.0 in dimension 0, which dominates the
    # residual stream, so after the final norm h[0] is about +sqrt(N_EMBD). A large
    # negative output weight on that dimension then pins the logits of EOS, other
    # control tokens and non-ASCII bytes far below the rest: generation always runs to
    # max_tokens and yields printable ASCII. Tests force a stop with logit_bias.
    token_embd = normal(N_VOCAB, N_EMBD)
    token_embd[:, 0] = 1.0
    output = normal(N_VOCAB, N_EMBD)
    output[:, 0] = 0.0
    output[_suppressed_ids(), 0] = -4.0

    # numpy shapes are (rows, cols); GGUF stores them reversed as ggml's (ne0, ne1).
    tensors = {"token_embd.weight": token_embd, "output_norm.weight": ones(N_EMBD)}
    for i in range(N_LAYER):
        tensors |= {
            f"blk.{i}.attn_norm.weight": ones(N_EMBD),
            f"blk.{i}.attn_q.weight": normal(N_HEAD * head_dim, N_EMBD),
            f"blk.{i}.attn_k.weight": normal(N_HEAD_KV * head_dim, N_EMBD),
            f"blk.{i}.attn_v.weight": normal(N_HEAD_KV * head_dim, N_EMBD),
            f"blk.{i}.attn_output.weight": normal(N_EMBD, N_HEAD * head_dim),
            f"blk.{i}.ffn_norm.weight": ones(N_EMBD),
            f"blk.{i}.ffn_gate.weight": normal(N_FF, N_EMBD),
            f"blk.{i}.ffn_up.weight": normal(N_FF, N_EMBD),
            f"blk.{i}.ffn_down.weight": normal(N_EMBD, N_FF),
        }
    tensors["output.weight"] = output
    return tensors


def write_tiny_llama(path: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write a ~0.5 MB f32 llama GGUF with a byte-fallback SentencePiece vocab and ChatML."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama-test")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(N_VOCAB)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(TOKENS))
    writer.add_token_scores(_token_scores())
    writer.add_token_types(_token_types())
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, data in _tensors(np.random.default_rng(seed)).items():
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
