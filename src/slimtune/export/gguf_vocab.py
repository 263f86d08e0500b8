"""A tokenizer as GGUF metadata, the way llama.cpp's convert_hf_to_gguf.py writes it.

Two kinds of vocabulary:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): `tokenizer.ggml.model = "gpt2"`, the tokens,
  their types, the merges and the pre-tokenizer's name (`tokenizer.ggml.pre`).
- SentencePiece (Llama 2, Mistral, Gemma, Phi-3): `tokenizer.ggml.model = "llama"`, the pieces
  with their scores (llama.cpp merges the adjacent pair whose joined piece scores highest) and
  types (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE). From the `tokenizer.model` file
  when the tokenizer has one (gguf-py's SentencePieceVocab, as the converter does); else from
  a tokenizer.json BPE with byte fallback (gguf-py's LlamaHfVocab), whose scores the converter
  leaves at -1000: here each piece scores minus the rank of the first merge that makes it,
  which gives llama.cpp's score-ordered merging the order of transformers' merge list.

Special token ids, add_bos/add_eos and the chat template come from gguf-py's SpecialVocab,
read from the tokenizer as `save_pretrained` writes it; add_bos/add_eos are then set to what the
tokenizer actually does on a test string.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from slimtune.errors import SlimtuneError

# pre-tokenizer split regexes of known byte-level BPE vocabularies -> llama.cpp's `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
UNKNOWN_SCORE, ADDED_SCORE = -10000.0, -1000.0  # the converter's scores for [PAD] / added tokens


def add_tokenizer(writer, tokenizer, config, n_vocab: int, say: Callable[[str], None]) -> None:
    """Vocabulary, scores or merges, token types, special ids, add_bos/eos and chat template."""
    from gguf import SpecialVocab

    spec = _tokenizer_json(tokenizer)
    spm_file = sentencepiece_file(tokenizer)
    sentencepiece = spm_file is not None or _is_sentencepiece_bpe(spec)
    if not sentencepiece and not _is_byte_level_bpe(spec):
        kind = (spec.get("model") or {}).get("type") or type(tokenizer).__name__
        raise SlimtuneError(
            "GGUF export supports byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and "
            f"SentencePiece (Llama 2, Mistral, Gemma, Phi-3) tokenizers; this one is {kind}"
        )
    with tempfile.TemporaryDirectory() as tmp, _quiet_gguf():
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        config.to_json_file(folder / "config.json")  # SpecialVocab's fallback for special ids
        if spm_file is not None:
            shutil.copyfile(spm_file, folder / "tokenizer.model")
            add_sentencepiece(writer, tokenizer, folder, n_vocab)
        elif sentencepiece:
            add_sentencepiece(writer, tokenizer, folder, n_vocab, spec=spec)
        else:
            add_byte_level_bpe(writer, tokenizer, spec, n_vocab, say)
        # the merges of a byte-level BPE; SentencePiece vocabularies merge by score
        special = SpecialVocab(folder, load_merges=not sentencepiece, n_vocab=n_vocab)
        special.add_special_token.update(added_specials(tokenizer))
        special.add_to_gguf(writer, quiet=True)


@contextmanager
def _quiet_gguf():
    """gguf-py logs its guesses about post-processors as warnings; they are not the user's."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _is_byte_level_bpe(spec: dict) -> bool:
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """transformers' conversion of a SentencePiece BPE model: byte fallback, no ByteLevel."""
    model = spec.get("model") or {}
    return bool(model.get("type") == "BPE" and model.get("byte_fallback"))


def sentencepiece_file(tokenizer) -> Path | None:
    """The tokenizer.model a SentencePiece tokenizer was loaded from, if it is still there."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    path = Path(vocab_file) if isinstance(vocab_file, str) else None
    return path if path is not None and path.suffix == ".model" and path.is_file() else None


def added_specials(tokenizer) -> dict[str, bool]:
    """{'bos': ..., 'eos': ...}: whether the tokenizer adds them around a plain text."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bool(bos is not None and ids[:1] == [bos]),
        "eos": bool(eos is not None and len(ids) > 1 and ids[-1] == eos),
    }


# --- byte-level BPE -----------------------------------------------------------------------


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer, None if unknown."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        return PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def vocabulary(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types, padded to the embedding's row count."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_byte_level_bpe(writer, tokenizer, spec: dict, n_vocab: int, say: Callable) -> None:
    """gpt2-model vocabulary; the merges are added by SpecialVocab(load_merges=True)."""
    pre = pre_tokenizer_name(spec)
    if pre is None:
        say("tokenizer: unknown pre-tokenizer, llama.cpp will split text with its 'default' rules")
        pre = "default"
    tokens, types = vocabulary(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


# --- SentencePiece ------------------------------------------------------------------------


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as CONTROL although not marked special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def sentencepiece_pieces(folder: Path, spec: dict | None) -> list[tuple[bytes, float, int]]:
    """(piece, score, type) for the base vocabulary, by gguf-py's SentencePieceVocab (from
    tokenizer.model) or LlamaHfVocab (from tokenizer.json, scores from the merge ranks)."""
    import gguf

    if spec is None:
        vocab = gguf.SentencePieceVocab(folder)
        return [(t, s, int(k)) for t, s, k in vocab.sentencepiece_tokens()]
    rank = merge_ranks(spec)
    pieces = []
    for text, _, kind in gguf.LlamaHfVocab(folder).hf_tokens():
        pieces.append((text, rank.get(text.decode("utf-8"), 0.0), int(kind)))
    return pieces


def merge_ranks(spec: dict) -> dict[str, float]:
    """-(rank of the first merge that makes each piece): the score order that reproduces it."""
    rank: dict[str, float] = {}
    for i, merge in enumerate(spec["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, -float(i))
    return rank


def add_sentencepiece(writer, tokenizer, folder: Path, n_vocab: int, spec=None) -> None:
    """The converter's _create_vocab_sentencepiece: pieces, [PAD] rows, added tokens on top."""
    from gguf import TokenType

    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [UNKNOWN_SCORE] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i, (text, score, kind) in enumerate(sentencepiece_pieces(folder, spec)[:n_vocab]):
        tokens[i], scores[i], types[i] = text, score, kind
    if spec is not None and tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = int(TokenType.UNKNOWN)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id >= n_vocab:
            continue
        content = added.content
        if added.special or looks_special(content):
            types[token_id] = int(TokenType.CONTROL)
        else:
            content = content.replace("\u2581", " ")  # the converter pre-normalizes user spaces
            types[token_id] = int(TokenType.USER_DEFINED)
        scores[token_id] = ADDED_SCORE
        tokens[token_id] = content.encode()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tokenizer))


def _adds_space_prefix(tokenizer) -> bool:
    """SentencePiece's add_dummy_prefix, as observed: does 'a' become a piece starting '▁'?"""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("\u2581")


# --- GGUF in, GGUF out --------------------------------------------------------------------


def copy_tokenizer_fields(writer, source_gguf, chat_template: str | None = None) -> None:
    """Copy every `tokenizer.*` key of a source GGUF verbatim (round trip keeps its layout);
    `chat_template` (an adapter trained with --chat-template) takes the source's place."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source_gguf)
    if chat_template is not None and "tokenizer.chat_template" not in reader.fields:
        writer.add_chat_template(chat_template)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if key == "tokenizer.chat_template" and chat_template is not None:
            writer.add_key_value(key, chat_template, GGUFValueType.STRING)
        elif field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), GGUFValueType.ARRAY, field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
