"""Constrained decoding: only the tokens a JSON schema, a regex or a Lark grammar allows next.

    Constraint   what the answer must match (json_schema, json_object, regex or lark)
    Grammars     the bundle's tokenizer in llguidance's terms, built once; checks a constraint
                 (a ValueError that names the problem) and makes a Matcher for each answer
    Matcher      one answer's parser state: consumes each sampled token
    Grammars.mask_logits  sets what a batch's matchers forbid to -inf in its [B, V] logits,
                 before sampling (greedy and sampled alike)

llguidance (Microsoft's Rust grammar engine, no torch) computes each row's mask: ~0.01 ms per
token at a 49k vocabulary, the masks of a batch in parallel; docs/serving.md has the measured cost
and why it was chosen over outlines-core and xgrammar. When the grammar is complete the mask
allows only EOS, so a constrained answer ends where its grammar does.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("json_schema", "json_object", "regex", "lark")
# JSON as OpenAI's and llama.cpp's constrained modes write it: no free whitespace between tokens,
# which a model (a random one above all) could otherwise fill without end
JSON_OPTIONS = {"whitespace_flexible": False}
# the largest grammar a constraint may compile to: a 100-property schema with nested objects and
# enums is ~24 KB; a 2,000-branch anyOf (a schema bomb) is ~160 KB
MAX_GRAMMAR_BYTES = 64 * 1024


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    source: str = ""  # the schema as JSON text, the regex or the Lark grammar; "" for json_object

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        # the schema's own property order: it is the order the answer writes them in
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls("lark", grammar)

    @classmethod
    def given(
        cls,
        json_schema: dict[str, Any] | str | None = None,
        json_object: bool = False,
        regex: str | None = None,
        lark: str | None = None,
    ) -> Constraint | None:
        """The one constraint among the keywords given (None for none of them)."""
        given = {"json_schema": json_schema, "json_object": json_object or None, "regex": regex, "lark": lark}
        named = [k for k, v in given.items() if v is not None]
        if len(named) > 1:
            raise ValueError(f"give one constraint, not {' and '.join(named)}")
        if not named:
            return None
        if named[0] == "json_schema":
            return cls.json_schema(json_schema)  # type: ignore[arg-type]
        return cls.json_object() if json_object else cls(named[0], given[named[0]])  # type: ignore[arg-type]

    def grammar(self) -> str:
        """The llguidance grammar (unchecked; Grammars.check validates it)."""
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"json_schema must be a JSON object, got {type(schema).__name__}")
            return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)


def _short(message: str, limit: int = 300) -> str:
    """The first line of an engine message, cut: errors carry whole grammars and parser dumps."""
    line = message.strip().splitlines()[0] if message.strip() else message
    return line if len(line) <= limit else line[:limit] + "…"


class Matcher:
    """One answer's position in its grammar."""

    def __init__(self, matcher: Any):
        self.m = matcher

    def consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise RuntimeError(f"token {token} broke the grammar: {_short(self.m.get_error())}")

    @property
    def done(self) -> bool:
        """The grammar is complete: only EOS may follow."""
        return self.m.is_stopped()


class Grammars:
    """Constraints for one tokenizer: `vocab` is the model's logits width (ids past the
    tokenizer's own are never allowed)."""

    def __init__(self, tokenizer_json: str, eos_token_id: int, vocab: int):
        self.tokenizer_json, self.eos, self.vocab = tokenizer_json, eos_token_id, vocab
        self._tokenizer: Any = None
        self._compiled: dict[Constraint, str] = {}
        self._lock = threading.Lock()
        self._executor: Any = None

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLExecutor, LLTokenizer

                self._tokenizer = LLTokenizer(self.tokenizer_json, n_vocab=self.vocab, eos_token=self.eos)
                self._executor = LLExecutor()
            return self._tokenizer

    def check(self, constraint: Constraint) -> str:
        """-> the checked grammar; ValueError with the engine's message when it is not one, when it
        compiles to over MAX_GRAMMAR_BYTES, or when its first token cannot be computed (a $ref
        cycle, a grammar past the engine's limits): refused here, never at an answer's first token."""
        with self._lock:
            if constraint in self._compiled:
                return self._compiled[constraint]
        from llguidance import LLMatcher

        tokenizer = self._llg_tokenizer()
        try:
            grammar = constraint.grammar()
        except ValueError as e:
            raise ValueError(f"{constraint.kind}: {_short(str(e))}") from None
        if len(grammar) > MAX_GRAMMAR_BYTES:
            raise ValueError(
                f"{constraint.kind}: compiles to a grammar of {len(grammar)} bytes, over the limit of "
                f"{MAX_GRAMMAR_BYTES} (fewer alternatives or properties)"
            )
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(
                f"{constraint.kind}: {_short(messages[0]) if messages else 'not a valid grammar'}"
            )
        first = LLMatcher(tokenizer, grammar, log_level=0)
        words = np.zeros((1, (self.vocab + 31) // 32), np.int32)
        self._first_mask(first, words)
        if first.is_error() or not words.any():
            reason = _short(first.get_error()) if first.is_error() else "no token can start an answer"
            raise ValueError(f"{constraint.kind}: admits no answer ({reason})")
        with self._lock:
            if len(self._compiled) >= 256:  # requests bring their own schemas: keep the latest
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[constraint] = grammar
        return grammar

    def _first_mask(self, m: Any, words: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        self._llg_tokenizer()
        fill_next_token_bitmask_par(self._executor, [(m, 0)], words)

    def matcher(self, constraint: Constraint) -> Matcher:
        from llguidance import LLMatcher

        m = LLMatcher(self._llg_tokenizer(), self.check(constraint), log_level=0)
        if m.is_error():
            raise ValueError(f"{constraint.kind}: {m.get_error()}")
        return Matcher(m)

    def mask_logits(self, logits: np.ndarray, matchers: list[Matcher | None]) -> np.ndarray:
        """logits [B, V]: -inf where row b's matcher forbids a token (rows without one untouched),
        changed in place and returned."""
        rows = [(m.m, b) for b, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        words = allocate_token_bitmask(len(matchers), self.vocab)  # [B, ceil(V / 32)] int32
        fill_next_token_bitmask_par(self._executor, rows, words)
        V = logits.shape[1]
        allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :V]  # [B, V]; 1 = allowed
        np.copyto(logits, np.float32(-np.inf), where=allowed == 0)  # rows without a matcher: all ones
        return logits
