"""SentencePiece BPE vocabularies (llama2.c ``tokenizer.bin`` or ``.model``) -> Hugging Face ``tokenizer.json``.

Llama-1/2 models and the llama2.c "stories" models ship their tokenizer as a SentencePiece BPE model: a list
of pieces, each with a score, and a few settings. tinyserve tokenizes with the Hugging Face ``tokenizers``
library, so this module rebuilds the same tokenizer there.

Two input formats:

- a SentencePiece ``.model`` file: a protobuf ``ModelProto``. We read it with a ~40-line protobuf reader
  below (no ``sentencepiece`` or ``protobuf`` package needed at runtime, and nothing is unpickled);
- a llama2.c ``tokenizer.bin``: ``int32 max_token_length``, then per token ``float32 score``,
  ``int32 length`` and that many UTF-8 bytes. It has no piece types and no settings, so we infer them
  (see ``_read_llama2c_bin``).

How SentencePiece BPE encodes a text, and how each step maps onto ``tokenizers``:

1. Normalize. With the "identity" rule nothing changes except whitespace: if ``remove_extra_whitespaces``
   is on (SentencePiece's default, and what llama2.c's own trained vocabularies use; Meta's Llama 2
   tokenizer turns it off) leading and trailing spaces are dropped and runs of spaces become one space.
   Then ``add_dummy_prefix`` puts one space in front of a non-empty text, and every space becomes "▁"
   (U+2581). -> a ``normalizers.Sequence`` of ``Replace`` / ``Prepend``. Only the ASCII space counts as
   whitespace here; newlines and tabs are ordinary characters (usually encoded as byte tokens).
2. Split the text into characters and repeatedly merge the adjacent pair whose concatenation is a piece
   with the highest score. -> a ``BPE`` model whose merge list is derived from the vocabulary: every way of
   cutting a piece into two pieces is a merge, and merges are ranked by the merged piece's score.
3. A character that no piece covers becomes its UTF-8 bytes, as the pieces ``<0x00>`` .. ``<0xFF>``
   (``byte_fallback``). -> ``BPE(byte_fallback=True)``.

Decoding reverses it: "▁" -> space, runs of byte tokens -> UTF-8 text, and the one leading space that the
dummy prefix introduced is stripped (exactly what llama2.c's ``decode`` does after BOS).

Known differences from SentencePiece (Llama-style vocabularies, whose normal pieces all have distinct
scores, avoid the first two):
- ties between two different pieces with the same score are broken by merge rank here, by text position
  in SentencePiece;
- a piece whose two halves are not both pieces can never be formed here;
- control tokens such as ``<s>`` typed literally in a text are recognised as special tokens here (as in
  transformers' Llama tokenizer); SentencePiece encodes them as plain characters;
- decoding strips one leading space, as llama2.c does; SentencePiece strips every leading space when the
  text starts with whitespace-only pieces (e.g. ids that encode "▁▁x").
"""

from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from tinyserve.errors import TinyserveError

SPACE_SYMBOL = "\u2581"  # "▁", SentencePiece's visible stand-in for a space
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class PieceType(enum.IntEnum):
    """``SentencePiece.Type`` from sentencepiece_model.proto."""

    NORMAL = 1  # an ordinary piece, produced by merges
    UNKNOWN = 2  # <unk>
    CONTROL = 3  # <s>, </s>: never produced from text
    USER_DEFINED = 4  # always kept whole when it appears in the text
    UNUSED = 5
    BYTE = 6  # <0x00> .. <0xFF>, the byte fallback


@dataclass
class SPVocab:
    """A SentencePiece BPE vocabulary: pieces in id order, their scores and types, and the settings we use.

    ``bos_id`` / ``eos_id`` / ``unk_id`` / ``pad_id`` are -1 when the vocabulary has no such token.
    """

    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    byte_fallback: bool = True
    source: str = ""  # where it was read from, for messages

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int) -> str | None:
        """The piece of ``token_id``, or None for -1 (no such token)."""
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None


# --------------------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------------------


def load_sentencepiece_vocab(
    path, vocab_size: int | None = None, *, remove_extra_whitespaces: bool | None = None
) -> SPVocab:
    """Read a SentencePiece ``.model`` or a llama2.c ``tokenizer.bin``.

    The format is chosen by extension (``.model`` / ``.bin``); for other names, by content (a llama2.c file
    starts with its header and then token 0, "<unk>"; anything else is read as a ModelProto).

    vocab_size: the model's vocabulary size. Required in spirit for ``.bin`` (the file does not store its
        token count; if None we read tokens until the end of the file); when given, the file must hold
        exactly that many tokens.
    remove_extra_whitespaces: overrides the whitespace rule (see the module docstring). None means: from
        the file for ``.model``; inferred for ``.bin`` (off if some piece contains two "▁" in a row, since
        such a piece can only be learned from text whose runs of spaces were kept; on otherwise).

    Raises TinyserveError for a missing, unreadable, corrupt or unsupported file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TinyserveError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise TinyserveError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None

    suffix = path.suffix.lower()
    if suffix == ".model" or (suffix != ".bin" and not _looks_like_llama2c_bin(data)):
        vocab = _read_sentencepiece_model(data, str(path))
        if vocab_size is not None and vocab_size != len(vocab):
            raise TinyserveError(
                f"{path}: the tokenizer has {len(vocab)} pieces but the model's vocab_size is {vocab_size}"
            )
    else:
        vocab = _read_llama2c_bin(data, str(path), vocab_size)
    if remove_extra_whitespaces is not None:
        vocab.remove_extra_whitespaces = remove_extra_whitespaces
    return vocab


def _looks_like_llama2c_bin(data: bytes) -> bool:
    """True if token 0 of a llama2.c layout is "<unk>" (llama2.c's exporter always writes it first)."""
    return data[8:12] == struct.pack("<i", 5) and data[12:17] == b"<unk>"


class _ProtoError(ValueError):
    """Malformed protobuf bytes (turned into a TinyserveError naming the file)."""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``buf[pos]``: 7 bits per byte, little end first, high bit = "more"."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise _ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _ProtoError("varint longer than 10 bytes")


def _proto_fields(buf: bytes):
    """Yield ``(field_number, wire_type, value)`` for each field of one protobuf message.

    value is an int for varints (wire type 0) and raw bytes for the others: 8 bytes (1), the payload of a
    length-delimited field - string, bytes or sub-message (2) - or 4 bytes (5). Groups (3, 4) are obsolete
    and never appear in a SentencePiece model, so they are rejected like any unknown wire type.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, pos = _read_varint(buf, pos)
            else:
                size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise _ProtoError(f"field {field} runs past the end of its message")
            value = buf[pos : pos + size]
            pos += size
        else:
            raise _ProtoError(f"unsupported wire type {wire} (field {field})")
        yield field, wire, value


def _expect(wire: int, expected: int, what: str) -> None:
    if wire != expected:
        raise _ProtoError(f"{what} has wire type {wire}, expected {expected}")


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtoError(f"{what} is not valid UTF-8") from None


# Field numbers from sentencepiece_model.proto (only the ones we use).
_MODEL_PIECES, _MODEL_TRAINER_SPEC, _MODEL_NORMALIZER_SPEC = 1, 2, 3
_PIECE_PIECE, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER = {  # varint fields: field -> (name, default)
    3: ("model_type", 1),  # 1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR
    24: ("treat_whitespace_as_suffix", 0),
    35: ("byte_fallback", 0),
}
# The special tokens. SentencePiece finds them at runtime by piece text, not by the trainer's unk_id /
# bos_id / ... fields (those only told the trainer where to put them): bos_id() is the id of bos_piece if
# that piece is a control symbol, else -1. We do the same.
_SPECIAL_PIECES = {  # string fields: field -> (name, default piece, the type the piece must have)
    45: ("unk_piece", "<unk>", PieceType.UNKNOWN),
    46: ("bos_piece", "<s>", PieceType.CONTROL),
    47: ("eos_piece", "</s>", PieceType.CONTROL),
    48: ("pad_piece", "<pad>", PieceType.CONTROL),
}
_NORMALIZER = {  # varint fields: field -> (name, default)
    3: ("add_dummy_prefix", 1),
    4: ("remove_extra_whitespaces", 1),
    5: ("escape_whitespaces", 1),
}
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def _parse_piece(buf: bytes, index: int) -> tuple[str, float, int]:
    """One ``SentencePiece`` message: (piece text, score, type)."""
    piece, score, ptype = None, 0.0, int(PieceType.NORMAL)
    for field, wire, value in _proto_fields(buf):
        if field == _PIECE_PIECE:
            _expect(wire, 2, "piece.piece")
            piece = _text(value, f"piece {index}")
        elif field == _PIECE_SCORE:
            _expect(wire, 5, "piece.score")
            (score,) = struct.unpack("<f", value)
        elif field == _PIECE_TYPE:
            _expect(wire, 0, "piece.type")
            ptype = value
    if piece is None:
        raise _ProtoError(f"piece {index} has no text")
    if ptype not in PieceType._value2member_map_:
        raise _ProtoError(f"piece {index} has unknown type {ptype}")
    return piece, score, ptype


def _parse_trainer_spec(buf: bytes, trainer: dict, special_pieces: dict) -> None:
    """Update ``trainer`` and ``special_pieces`` with the fields of one ``TrainerSpec`` message."""
    for field, wire, value in _proto_fields(buf):
        if field in _TRAINER:
            name = _TRAINER[field][0]
            _expect(wire, 0, name)
            trainer[name] = value
        elif field in _SPECIAL_PIECES:
            name = _SPECIAL_PIECES[field][0]
            _expect(wire, 2, name)
            special_pieces[name] = _text(value, name)


def _parse_normalizer_spec(buf: bytes, normalizer: dict) -> None:
    """Update ``normalizer`` with the fields of one ``NormalizerSpec`` message."""
    for field, wire, value in _proto_fields(buf):
        if field in _NORMALIZER:
            name = _NORMALIZER[field][0]
            _expect(wire, 0, name)
            normalizer[name] = value
        elif field == 1:
            _expect(wire, 2, "normalizer name")
            normalizer["name"] = _text(value, "normalizer name")
        elif field == 2:
            _expect(wire, 2, "precompiled_charsmap")
            normalizer["precompiled_charsmap"] = value


def _read_sentencepiece_model(data: bytes, source: str) -> SPVocab:
    """Parse a ModelProto: the pieces, the trainer settings and the normalizer settings we need.

    A sub-message that appears twice is merged field by field, as protobuf specifies.
    """
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer = {name: default for name, default in _TRAINER.values()}
    special_pieces = {name: piece for name, piece, _ in _SPECIAL_PIECES.values()}
    normalizer = {name: default for name, default in _NORMALIZER.values()}
    normalizer["name"], normalizer["precompiled_charsmap"] = "", b""
    seen_fields = set()
    try:
        for field, wire, value in _proto_fields(data):
            seen_fields.add(field)
            if field == _MODEL_PIECES:
                _expect(wire, 2, "a piece")
                piece, score, ptype = _parse_piece(value, len(pieces))
                pieces.append(piece)
                scores.append(score)
                types.append(ptype)
            elif field == _MODEL_TRAINER_SPEC:
                _expect(wire, 2, "trainer_spec")
                _parse_trainer_spec(value, trainer, special_pieces)
            elif field == _MODEL_NORMALIZER_SPEC:
                _expect(wire, 2, "normalizer_spec")
                _parse_normalizer_spec(value, normalizer)
            # Other fields (self-test data, the denormalizer) do not affect encoding.
    except _ProtoError as e:
        raise TinyserveError(f"{source}: not a valid SentencePiece model ({e})") from None

    # Protobuf has no end marker: a file cut at a field boundary parses. SentencePiece always writes the
    # pieces, then trainer_spec, then normalizer_spec, so a missing part means a truncated (or foreign) file.
    for field, what in [
        (_MODEL_PIECES, "pieces"),
        (_MODEL_TRAINER_SPEC, "trainer_spec"),
        (_MODEL_NORMALIZER_SPEC, "normalizer_spec"),
    ]:
        if field not in seen_fields:
            raise TinyserveError(f"{source}: not a valid SentencePiece model (no {what}; truncated?)")
    model_type = trainer["model_type"]
    if model_type != 2:
        kind = _MODEL_TYPES.get(model_type, f"type {model_type}")
        raise TinyserveError(f"{source}: a SentencePiece {kind} model; only BPE models are supported")
    if normalizer["precompiled_charsmap"]:
        raise TinyserveError(
            f"{source}: SentencePiece normalization rule {normalizer['name']!r} is not supported "
            "(only 'identity', as in Llama tokenizers)"
        )
    if trainer["treat_whitespace_as_suffix"]:
        raise TinyserveError(f"{source}: treat_whitespace_as_suffix is not supported")
    ids = {p: i for i, p in enumerate(pieces)}
    special_ids = {}  # unk_id, bos_id, eos_id, pad_id
    for name, _, required_type in _SPECIAL_PIECES.values():
        token_id = ids.get(special_pieces[name], -1)
        if token_id >= 0 and types[token_id] != required_type:
            token_id = -1
        special_ids[name.replace("_piece", "_id")] = token_id
    return SPVocab(
        pieces=pieces,
        scores=scores,
        types=types,
        **special_ids,
        add_dummy_prefix=bool(normalizer["add_dummy_prefix"]),
        remove_extra_whitespaces=bool(normalizer["remove_extra_whitespaces"]),
        escape_whitespaces=bool(normalizer["escape_whitespaces"]),
        byte_fallback=bool(trainer["byte_fallback"]),
        source=source,
    )


def _read_llama2c_bin(data: bytes, source: str, vocab_size: int | None) -> SPVocab:
    """Parse a llama2.c ``tokenizer.bin`` and restore what its export dropped.

    llama2.c's ``tokenizer.py`` exports each piece with "▁" replaced by a space, and BOS / EOS as
    "\\n<s>\\n" / "\\n</s>\\n". We undo that, and rebuild the types llama2.c assumes: id 0 is <unk>, 1 is
    <s>, 2 is </s>, ``<0xNN>`` pieces are bytes (so byte fallback is on when they exist), the rest normal.
    """
    if vocab_size is not None and vocab_size <= 3:
        raise TinyserveError(f"{source}: vocab_size must be more than 3, got {vocab_size}")
    if len(data) < 4:
        raise TinyserveError(f"{source}: not a llama2.c tokenizer (shorter than its 4-byte header)")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    if max_token_length <= 0:
        raise TinyserveError(f"{source}: not a llama2.c tokenizer (max_token_length is {max_token_length})")
    pieces: list[str] = []
    scores: list[float] = []
    pos = 4
    while pos < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        where = f"{source}: token {len(pieces)}"
        if pos + 8 > len(data):
            raise TinyserveError(f"{where}: file is truncated")
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not 0 <= length <= max_token_length:
            raise TinyserveError(f"{where}: length {length} is outside 0..{max_token_length}; file is corrupt")
        if pos + length > len(data):
            raise TinyserveError(f"{where}: file is truncated")
        try:
            text = data[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise TinyserveError(f"{where}: piece is not valid UTF-8; file is corrupt") from None
        pos += length
        pieces.append(text)
        scores.append(score)
    if vocab_size is not None and len(pieces) < vocab_size:
        raise TinyserveError(f"{source}: file is truncated: {len(pieces)} tokens, expected {vocab_size}")
    if pos != len(data):
        raise TinyserveError(
            f"{source}: {len(data) - pos} bytes left after {len(pieces)} tokens; "
            "is vocab_size right for this tokenizer?"
        )
    if len(pieces) <= 3:
        raise TinyserveError(f"{source}: only {len(pieces)} tokens; not a llama2.c tokenizer")

    types = []
    for i, text in enumerate(pieces):
        if i in (1, 2):
            pieces[i] = "<s>" if i == 1 else "</s>"
            types.append(PieceType.CONTROL)
        elif i == 0:
            pieces[i] = "<unk>"
            types.append(PieceType.UNKNOWN)
        elif _BYTE_PIECE.fullmatch(text):
            types.append(PieceType.BYTE)
        else:
            pieces[i] = text.replace(" ", SPACE_SYMBOL)
            types.append(PieceType.NORMAL)
    return SPVocab(
        pieces=pieces,
        scores=scores,
        types=[int(t) for t in types],
        bos_id=1,
        eos_id=2,
        unk_id=0,
        add_dummy_prefix=True,  # llama2.c's encode() always adds it
        remove_extra_whitespaces=not any(SPACE_SYMBOL * 2 in p for p in pieces),
        byte_fallback=PieceType.BYTE in types,
        source=source,
    )


# --------------------------------------------------------------------------------------------------------
# Building the Hugging Face tokenizer
# --------------------------------------------------------------------------------------------------------


def bpe_merges(vocab: SPVocab) -> list[tuple[str, str]]:
    """The BPE merge list that makes ``tokenizers`` merge in SentencePiece's order.

    SentencePiece has no merge list: at each step it joins the adjacent pair whose concatenation is the
    highest-scoring piece. ``tokenizers`` applies the lowest-ranked merge from a list instead. So every
    split of a normal piece into two normal pieces becomes a merge, ranked by the merged piece's score
    (highest first), then by the merged piece's id, then by the left half's id, so the order is fixed.
    """
    ids = {p: i for i, p in enumerate(vocab.pieces) if vocab.types[i] == PieceType.NORMAL}
    ranked = []
    for merged, merged_id in ids.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[merged_id], merged_id, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(vocab: SPVocab) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes and decodes like SentencePiece (Llama-2 style).

    - model: BPE over the vocabulary with ``bpe_merges``; byte fallback; runs of unknowns fuse into one.
    - normalizer: SentencePiece's whitespace handling (module docstring, step 1).
    - special tokens: the control and unknown pieces (<s>, </s>, <unk>).
    - post-processor: prepends BOS when ``add_special_tokens=True``.
    - decoder: "▁" -> " ", byte tokens -> UTF-8, strip the dummy prefix's single leading space.
    """
    _check_vocab(vocab)
    unk = vocab.piece(vocab.unk_id)
    model = BPE(
        vocab={p: i for i, p in enumerate(vocab.pieces)},
        merges=bpe_merges(vocab),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=vocab.byte_fallback,
    )
    tokenizer = Tokenizer(model)

    # Control/unknown pieces are special: kept whole, skipped by decode(skip_special_tokens=True).
    # User-defined pieces are matched whole in the raw text (as transformers' converter does).
    specials = [i for i, t in enumerate(vocab.types) if t in (PieceType.CONTROL, PieceType.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(vocab.pieces[i], special=True, normalized=False) for i in specials])
    user = [p for p, t in zip(vocab.pieces, vocab.types) if t == PieceType.USER_DEFINED]
    if user:
        tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])

    tokenizer.normalizer = normalizers.Sequence(_normalizer_steps(vocab))
    tokenizer.pre_tokenizer = None  # SentencePiece BPE sees the whole normalized text as one sequence

    space = SPACE_SYMBOL if vocab.escape_whitespaces else " "
    steps = [decoders.Replace(space, " ")]
    if vocab.byte_fallback:
        steps.append(decoders.ByteFallback())  # runs of <0xNN> -> UTF-8 text (U+FFFD where invalid)
    steps.append(decoders.Fuse())  # one string, so that Strip only touches the very beginning
    if vocab.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)

    bos = vocab.piece(vocab.bos_id)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab.bos_id)],
        )
    return tokenizer


def _normalizer_steps(vocab: SPVocab) -> list:
    """SentencePiece's normalization for the identity rule, as ``tokenizers`` normalizers."""
    steps = []
    if vocab.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))  # runs of spaces -> one space
        steps.append(normalizers.Replace(Regex(r"\A | \z"), ""))  # no space at either end (\A, \z: whole text)
    space = SPACE_SYMBOL if vocab.escape_whitespaces else " "
    if vocab.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))  # Prepend leaves an empty text empty, as SentencePiece does
    if vocab.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE_SYMBOL))
    return steps


def _check_vocab(vocab: SPVocab) -> None:
    """Reject vocabularies that cannot become a tokenizer (e.g. built by hand, or from an odd file)."""
    n = len(vocab.pieces)
    if not n or len(vocab.scores) != n or len(vocab.types) != n:
        raise TinyserveError(f"{vocab.source or 'vocabulary'}: pieces, scores and types differ in length")
    nan = next((i for i, x in enumerate(vocab.scores) if x != x), None)  # merges are ranked by score
    if nan is not None:
        raise TinyserveError(f"{vocab.source or 'vocabulary'}: piece {vocab.pieces[nan]!r} (id {nan}) has a NaN score")
    seen: dict[str, int] = {}
    for i, p in enumerate(vocab.pieces):
        if p in seen:
            raise TinyserveError(f"{vocab.source or 'vocabulary'}: piece {p!r} appears twice (ids {seen[p]}, {i})")
        seen[p] = i


# --------------------------------------------------------------------------------------------------------
# Writing the files
# --------------------------------------------------------------------------------------------------------


def write_tokenizer_files(vocab: SPVocab, out_dir, model_max_length: int | None = None) -> tuple[Path, Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created if needed).

    The config names ``PreTrainedTokenizerFast``, which loads ``tokenizer.json`` exactly as written.
    (transformers' ``LlamaTokenizerFast`` would rebuild its own normalizer and pre-tokenizer from the
    vocabulary and lose ``remove_extra_whitespaces``.) Returns the two paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.json"
    config_path = out_dir / "tokenizer_config.json"
    build_tokenizer(vocab).save(str(tokenizer_path))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": vocab.piece(vocab.bos_id),
        "eos_token": vocab.piece(vocab.eos_id),
        "unk_token": vocab.piece(vocab.unk_id),
        "pad_token": vocab.piece(vocab.pad_id),
        "add_bos_token": vocab.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer_path, config_path
