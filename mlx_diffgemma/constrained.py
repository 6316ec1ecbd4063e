"""Output constrained to a regular language: a regex, or a JSON schema turned into one.

``outlines-core`` compiles the regex into an automaton over the tokenizer's vocabulary
(which token moves which state to which). Here that automaton is grouped into token
classes (tokens with identical transitions in every state), so that a canvas step
reduces the ``[C, V]`` distributions to ``[C, K]`` class scores once, and then runs
dynamic programs over canvas positions and automaton states (the approach of DINGO,
Suresh et al. 2025):

- ``viterbi``: the most probable canvas the automaton accepts (its argmax);
- ``forward_backward``: a canvas sampled from the step's per-position distributions
  conditioned on acceptance, and each position's marginal entropy under that condition
  (what the entropy bound sees).

A canvas must end in a state from which the language can still be completed within the
tokens left (``max_tokens``); the last one ends in an accepting state, or after it in
EOS. The committed canvas advances the automaton's state for the next one.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .host import pool

JSON_OBJECT = '{"type": "object"}'  # outlines-core writes it as JSON with bounded nesting
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNREACHABLE = np.iinfo(np.int32).max


def schema_regex(schema: dict[str, Any] | str | bool, whitespace: str | None = None) -> str:
    """The regex of the JSON texts that a JSON schema accepts, or a ValueError naming the problem.
    ``whitespace`` is the pattern allowed between tokens (the library's default: one optional space)."""
    import jsonschema
    from outlines_core.json_schema import build_regex_from_schema

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError("a JSON schema must be an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"invalid JSON schema: {e.message}") from None
    ignored = _first_problem(schema, "#", _ignored_keyword)
    if ignored:
        raise ValueError(f"unsupported JSON schema: {ignored}")
    try:
        return build_regex_from_schema(json.dumps(schema), whitespace_pattern=whitespace)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"unsupported JSON schema: {str(e).splitlines()[0]}") from None
    except BaseException as e:  # the Rust side panics on some schemas
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"unsupported JSON schema: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# Gemma 4's tool-call marker tokens, written in a tool call's regex as private-use characters
# (U+E000-U+E002); ordinary tokens that write the byte those begin with are then left out.
TOOL_MARKERS = {'<|"|>': "\ue000", "<|tool_call>": "\ue001", "<tool_call|>": "\ue002"}
_MARKER_LEAD = "\ue000".encode()[:1]


def tool_call_regex(tools: list[dict[str, Any]], name: str | None = None) -> str:
    """The regex of one Gemma 4 tool call, ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>``,
    to ``name`` (or to any of ``tools``, OpenAI's function form), with arguments valid against
    the function's parameters: a JSON schema's regex with bare keys and ``<|"|>`` for quotes."""
    calls = []
    for tool in tools:
        function = tool["function"]
        if name is None or function["name"] == name:
            parameters = function.get("parameters") or {"type": "object", "properties": {}}
            calls.append(re.escape(function["name"]) + _gemma_arguments(parameters, function["name"]))
    if not calls:
        raise ValueError(f"no declared tool is named {name!r}")
    return TOOL_MARKERS["<|tool_call>"] + "call:(" + "|".join(calls) + ")" + TOOL_MARKERS["<tool_call|>"]


def _gemma_arguments(schema: dict[str, Any], name: str) -> str:
    problem = _first_problem(schema, "#", _gemma_unwritable)
    if problem:
        raise ValueError(f"the parameters of '{name}' cannot be written in Gemma 4's call format: {problem}")
    regex = re.sub(r'"(\w+)":', r"\1:", schema_regex(schema, whitespace=""))
    return _without_markers(regex).replace('"', TOOL_MARKERS['<|"|>'])


def _without_markers(regex: str) -> str:
    """``regex`` with the markers' stand-ins taken out of its negated classes and ``.``: a value
    may then never hold a marker, which the model could otherwise write inside a string (it
    would count as one character there, and break the call once decoded)."""
    markers = "".join(TOOL_MARKERS.values())
    out, i, in_class = [], 0, False
    while i < len(regex):
        if regex[i] == "\\":
            out.append(regex[i : i + 2])
            i += 2
            continue
        if not in_class and regex.startswith("[^", i):
            out.append("[^" + markers)
            in_class, i = True, i + 2
            continue
        if not in_class and regex[i] == ".":
            out.append("[^\\n" + markers + "]")
        else:
            out.append(regex[i])
            in_class = (in_class or regex[i] == "[") and not (in_class and regex[i] == "]")
        i += 1
    return "".join(out)


def _gemma_unwritable(schema: dict[str, Any], path: str) -> str | None:
    """Why a (sub)schema's values could not be parsed back from Gemma 4's format, if they could not:
    keys are written bare (so they must be word characters) and objects need named properties."""
    if schema.get("type") == "object" and not schema.get("properties") and path != "#":
        return f"an object without named properties at {path}"
    bad = next((n for n in schema.get("properties") or {} if not re.fullmatch(r"\w+", n)), None)
    return None if bad is None else f"the property name {bad!r} at {path} is not made of letters, digits and '_'"


# Keywords outlines-core accepts but does not enforce: a reply could break them, so they are refused.
IGNORED_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
                    "contains", "minContains", "maxContains", "patternProperties", "propertyNames",
                    "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
                    "unevaluatedItems", "maxProperties")
_NAMED_SCHEMAS = ("properties", "$defs", "definitions")  # maps of names to schemas
_DATA = ("enum", "const", "default", "examples", "required")  # values, not schemas


def _ignored_keyword(schema: dict[str, Any], path: str) -> str | None:
    keyword = next((k for k in IGNORED_KEYWORDS if k in schema), None)
    return None if keyword is None else f"'{keyword}' (at {path}) cannot be enforced"


def _first_problem(schema: Any, path: str, check) -> str | None:
    """The first problem ``check(subschema, path)`` finds in ``schema`` or any schema inside it."""
    if isinstance(schema, list):
        return next((w for i, sub in enumerate(schema) if (w := _first_problem(sub, f"{path}/{i}", check))), None)
    if not isinstance(schema, dict):
        return None
    problem = check(schema, path)
    for key, value in schema.items():
        if problem:
            break
        if key in _DATA:
            continue
        if key in _NAMED_SCHEMAS and isinstance(value, dict):
            problem = next((w for n, sub in value.items() if (w := _first_problem(sub, f"{path}/{key}/{n}", check))), None)
        else:
            problem = _first_problem(value, f"{path}/{key}", check)
    return problem


def token_bytes(tokenizer, markers: bool = False) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes, as a map from bytes to the ids that write them.

    SentencePiece vocabularies (Gemma's) write a space as ``▁`` and bytes as ``<0xNN>``;
    other tokens are taken as they decode alone. Special tokens write nothing a regex
    can match, so they are left out (after EOS anything goes, see ``Automaton``). With
    ``markers``, Gemma 4's tool-call markers write their stand-ins (``TOOL_MARKERS``), and
    no other token may write a byte that begins one.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer.get_vocab()))))
    spm = any(p and p.startswith("▁") for p in pieces)
    out: dict[bytes, list[int]] = {}
    for i, piece in enumerate(pieces):
        if markers and piece in TOOL_MARKERS:
            out.setdefault(TOOL_MARKERS[piece].encode(), []).append(i)
            continue
        if piece is None or i in special:
            continue
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            data = bytes([int(byte.group(1), 16)])
        elif spm:
            data = piece.replace("▁", " ").encode()
        else:
            text = tokenizer.decode([i])
            if "\ufffd" in text:
                continue
            data = text.encode()
        if data and not (markers and _MARKER_LEAD in data):
            out.setdefault(data, []).append(i)
    if markers and len(out.keys() & {m.encode() for m in TOOL_MARKERS.values()}) < len(TOOL_MARKERS):
        raise ValueError("this model's tokenizer lacks Gemma 4's tool-call markers (<|tool_call>, <tool_call|>, <|\"|>)")
    return out


@dataclass
class Automaton:
    """A regex's automaton over token classes, plus an absorbing state ``done`` after EOS.

    ``next[q, k]`` is the state token class ``k`` leads to from state ``q`` (``-1``: not
    allowed). ``order``/``starts`` list the vocabulary sorted by class, for reductions;
    the edges (every allowed ``(q, k)``) are kept sorted by target and by source.
    """

    start: int
    done: int
    next: np.ndarray  # [S, K] int32
    token_class: np.ndarray  # [V] int32
    order: np.ndarray  # [V] token ids sorted by class
    starts: np.ndarray  # [K] where each class begins in ``order``
    distance: np.ndarray  # [S] fewest tokens to an accepting state (0 for accepting states and done)

    def __post_init__(self):
        # The programs run over pairs of states (``src -> dst``) rather than (state, class)
        # edges: a JSON string's states move most classes to the same next state. A pair's
        # classes form one of a few distinct class sets, so per-position scores of pairs
        # come from per-set reductions of the ``[n, K]`` class scores.
        src, cls = np.nonzero(self.next >= 0)
        dst = self.next[src, cls]
        order = np.lexsort((cls, dst, src))
        src, dst, cls = src[order], dst[order], cls[order]
        new_pair = np.ones(len(src), dtype=bool)
        new_pair[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
        starts = np.flatnonzero(new_pair)
        self.pair_src, self.pair_dst = src[starts], dst[starts]
        sets: dict[bytes, int] = {}
        self.pair_set = np.array([sets.setdefault(c.tobytes(), len(sets)) for c in np.split(cls, starts[1:])], dtype=np.int64)
        members = [np.frombuffer(key, dtype=cls.dtype) for key in sets]
        self.set_members = np.concatenate(members)
        self.set_starts = np.cumsum([0] + [len(m) for m in members[:-1]])
        self.set_classes = np.zeros((len(members), self.next.shape[1]))  # [D, K] membership
        for d, m in enumerate(members):
            self.set_classes[d, m] = 1.0
        states = np.arange(self.next.shape[0])
        self.into = np.argsort(self.pair_dst, kind="stable")  # pairs entering q: into[into_first[q]:into_last[q]]
        self.into_first = np.searchsorted(self.pair_dst[self.into], states)
        self.into_last = np.searchsorted(self.pair_dst[self.into], states, side="right")

    def pairs_into(self, state: int) -> np.ndarray:
        return self.into[self.into_first[state] : self.into_last[state]]

    def set_scores(self, scores: np.ndarray, reduce: np.ufunc) -> np.ndarray:
        """``[n, K]`` class scores reduced (``np.maximum`` or ``np.add``) over each class set: ``[n, D]``."""
        return reduce.reduceat(scores[:, self.set_members], self.set_starts, axis=1)

    def classes_of(self, pair: int) -> np.ndarray:
        d = self.pair_set[pair]
        stop = self.set_starts[d + 1] if d + 1 < len(self.set_starts) else len(self.set_members)
        return self.set_members[self.set_starts[d] : stop]

    @property
    def num_states(self) -> int:
        return self.next.shape[0]

    @property
    def num_classes(self) -> int:
        return self.next.shape[1]

    @classmethod
    def build(cls, regex: str, tokenizer, vocab_size: int | None = None) -> "Automaton":
        """Compile ``regex`` over ``tokenizer``'s vocabulary; a ValueError if the library cannot."""
        from outlines_core import Index, Vocabulary

        eos_ids = sorted(set(tokenizer.eos_token_ids))
        vocabulary = Vocabulary(eos_ids[0], _vocabulary(tokenizer, any(m in regex for m in TOOL_MARKERS.values())))
        try:
            index = Index(regex, vocabulary)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"cannot compile the regex: {str(e).splitlines()[0]}") from None
        except BaseException as e:  # panics of the Rust side
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"cannot compile the regex: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        vocab = vocab_size or len(tokenizer.get_vocab())
        transitions = index.get_transitions()
        ids = {state: i for i, state in enumerate(sorted(transitions.keys() | set(index.get_final_states())))}
        done = len(ids)
        eos = np.array(eos_ids, dtype=np.int64)
        rows = []
        for state, i in ids.items():
            moves = {t: n for t, n in transitions.get(state, {}).items() if t not in eos_ids and t < vocab}
            tokens = np.fromiter(moves.keys(), dtype=np.int64, count=len(moves))
            targets = np.fromiter((ids[n] for n in moves.values()), dtype=np.int64, count=len(moves))
            if index.is_final_state(state):
                tokens, targets = np.concatenate([tokens, eos]), np.concatenate([targets, np.full(len(eos), done)])
            rows.append((i, tokens, targets))
        token_class = _classes(rows, vocab)
        table = np.full((done + 1, int(token_class.max()) + 1), -1, dtype=np.int32)
        for i, tokens, targets in rows:
            table[i, token_class[tokens]] = targets
        finals = [ids[s] for s in index.get_final_states()]
        return cls.from_table(table, token_class, ids[index.get_initial_state()], finals)

    @classmethod
    def from_table(cls, table: np.ndarray, token_class: np.ndarray, start: int, finals: list[int]) -> "Automaton":
        """An automaton from a transition table over token classes (``[S + 1, K]``, ``-1`` where
        refused) whose last row is the state after EOS (made absorbing here), for languages
        written directly rather than as a regex (``sudoku.rule_automaton``)."""
        done = table.shape[0] - 1
        table[done, :] = done
        order = np.argsort(token_class, kind="stable")
        starts = np.searchsorted(token_class[order], np.arange(table.shape[1]))
        return cls(start, done, table, token_class, order, starts, _distances(table, list(finals) + [done]))

    def advance(self, state: int, tokens: list[int]) -> int:
        """The state after ``tokens``; a ValueError if the automaton refuses one."""
        for t in tokens:
            state = int(self.next[state, self.token_class[t]])
            if state < 0:
                raise ValueError("the tokens leave the constrained language")
        return state


def _vocabulary(tokenizer, markers: bool) -> dict[bytes, list[int]]:
    key = (id(tokenizer), markers)
    if key not in _VOCABULARIES:
        _VOCABULARIES[key] = token_bytes(tokenizer, markers)
        while len(_VOCABULARIES) > 4:
            _VOCABULARIES.popitem(last=False)
    return _VOCABULARIES[key]


_VOCABULARIES: OrderedDict[tuple[int, bool], dict[bytes, list[int]]] = OrderedDict()


def _classes(rows: list[tuple[int, np.ndarray, np.ndarray]], vocab: int) -> np.ndarray:
    """Token classes: tokens whose (state, target) pairs agree in every state, by a 64-bit hash of them."""
    signature = np.zeros(vocab, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for state, tokens, targets in rows:
            step = (np.uint64(state) * np.uint64(0x9E3779B97F4A7C15)) ^ (targets.astype(np.uint64) + np.uint64(1))
            signature[tokens] = signature[tokens] * np.uint64(0xBF58476D1CE4E5B9) + step * np.uint64(0x94D049BB133111EB)
    return np.unique(signature, return_inverse=True)[1].astype(np.int32).reshape(-1)


def _distances(table: np.ndarray, finals: list[int]) -> np.ndarray:
    """Fewest transitions from each state to an accepting one (breadth first, backwards)."""
    distance = np.full(table.shape[0], _UNREACHABLE, dtype=np.int64)
    distance[finals] = 0
    frontier, d = np.zeros(table.shape[0], dtype=bool), 0
    frontier[finals] = True
    while frontier.any():
        d += 1
        reach = ((table >= 0) & frontier[np.maximum(table, 0)]).any(axis=1) & (distance == _UNREACHABLE)
        distance[reach] = d
        frontier = reach
    return distance


def check_length(automaton: Automaton, max_tokens: int) -> None:
    """Refuse a request whose shortest accepted output is longer than ``max_tokens``."""
    shortest = int(automaton.distance[automaton.start])
    if shortest == _UNREACHABLE:
        raise ValueError("the constraint accepts no output at all")
    if shortest > max_tokens:
        raise ValueError(f"the shortest output the constraint allows is {shortest} tokens, more than max_tokens ({max_tokens})")


def end_states(automaton: Automaton, tokens_after: int) -> np.ndarray:
    """States a canvas may end in when ``tokens_after`` tokens may still follow it."""
    return automaton.distance <= tokens_after


def class_scores(automaton: Automaton, logits: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per position and token class: the largest logit, the probability mass, and ``sum(p * logit)``.

    ``logits``/``probs`` are one row's ``[n, V]`` scaled logits and their softmax. A class
    whose float32 mass underflows to zero still weighs ``exp(max logit - logsumexp)``.
    The positions are split between threads: numpy's gathers and reductions release the GIL,
    and the cores are otherwise idle while the host reads a step's logits.
    """
    n = logits.shape[0]
    best = np.empty((n, automaton.num_classes))
    mass, px = np.empty_like(best), np.empty_like(best)
    lse = (logits.max(axis=1) - np.log(probs.max(axis=1))).astype(np.float64)

    def part(rows: slice) -> None:
        x = np.take(logits[rows], automaton.order, axis=1)
        p = np.take(probs[rows], automaton.order, axis=1)
        best[rows] = np.maximum.reduceat(x, automaton.starts, axis=1)
        mass[rows] = np.add.reduceat(p, automaton.starts, axis=1)
        px[rows] = np.add.reduceat(np.multiply(p, x, out=p), automaton.starts, axis=1)

    chunks = [slice(i, i + _CHUNK) for i in range(0, n, _CHUNK)]
    if len(chunks) == 1:
        part(chunks[0])
    else:
        list(pool().map(part, chunks))
    return best, np.maximum(mass, np.exp(best - lse[:, None])), px, lse


_CHUNK = 16  # positions per thread task


@dataclass
class Lattice:
    """The pairs each position of a canvas can take, given the state it starts in: position
    ``i``'s pairs are ``[offsets[i]:offsets[i + 1]]`` of the flat arrays, sorted by target,
    so that reductions over ``heads[i]`` give one value per state in ``targets[i]``. The
    same for every step of a canvas, so a ``Guide`` builds it once. Flat indices into
    ``[n + 1, S]`` state arrays (``from_``, ``to``) and ``[n, D]`` set scores (``set_at``)
    let the work that is not sequential in the positions run as single array operations."""

    src: np.ndarray
    from_: np.ndarray  # i * S + src
    to: np.ndarray  # (i + 1) * S + dst
    set_at: np.ndarray  # i * D + the pair's class set
    offsets: np.ndarray
    heads: list[np.ndarray]
    targets: list[np.ndarray]

    @classmethod
    def build(cls, automaton: Automaton, state: int, n: int) -> "Lattice":
        a, parts, heads, targets = automaton, [], [], []
        src_into, dst_into = a.pair_src[a.into], a.pair_dst[a.into]  # every pair, by target
        reach = np.zeros(a.num_states, dtype=bool)
        reach[state] = True
        for _ in range(n):
            leaving = reach[src_into]
            dst = dst_into[leaving]
            new = np.ones(len(dst), dtype=bool)
            new[1:] = dst[1:] != dst[:-1]
            parts.append(a.into[leaving])
            heads.append(np.flatnonzero(new))
            targets.append(dst[new])
            reach[:] = False
            reach[targets[-1]] = True
        pairs = np.concatenate(parts)
        lengths = [len(q) for q in parts]
        pos = np.repeat(np.arange(n), lengths)
        size, sets = a.num_states, len(a.set_starts)
        return cls(a.pair_src[pairs], pos * size + a.pair_src[pairs], (pos + 1) * size + a.pair_dst[pairs],
                   pos * sets + a.pair_set[pairs], np.cumsum([0] + lengths), heads, targets)

    def at(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])


def viterbi(automaton: Automaton, score: np.ndarray, state: int, end: np.ndarray,
            lattice: Lattice | None = None) -> tuple[np.ndarray, int]:
    """The class sequence maximizing ``sum(score[i, k_i])`` along an accepted path from ``state``
    to a state in ``end`` (a bool mask), and the state it ends in."""
    a = automaton
    n = score.shape[0]
    lat = lattice or Lattice.build(a, state, n)
    set_score = a.set_scores(score, np.maximum)  # [n, D]
    flat = set_score.ravel()[lat.set_at]
    best = np.full((n + 1, a.num_states), -np.inf)
    best[0, state] = 0.0
    cells = best.ravel()
    for i in range(n):
        at = lat.at(i)
        best[i + 1, lat.targets[i]] = np.maximum.reduceat(cells[lat.from_[at]] + flat[at], lat.heads[i])
    final = np.where(end, best[n], -np.inf)
    q = int(final.argmax())
    if not np.isfinite(final[q]):
        raise ValueError("no accepted canvas: the automaton state cannot be completed")
    last, path = q, np.empty(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        pairs = a.pairs_into(q)
        pair = pairs[np.argmax(best[i, a.pair_src[pairs]] + set_score[i, a.pair_set[pairs]])]
        classes = a.classes_of(pair)
        path[i], q = classes[np.argmax(score[i, classes])], int(a.pair_src[pair])
    return path, last


def forward_backward(automaton: Automaton, mass: np.ndarray, state: int, end: np.ndarray,
                     lattice: Lattice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Forward weights of accepted paths (``[n + 1, S]``, normalized per position) and each
    position's class marginals (``[n, K]``: the probability that position ``i`` holds a
    token of class ``k``, over accepted canvases)."""
    a = automaton
    n, size = mass.shape[0], a.num_states
    lat = lattice or Lattice.build(a, state, n)
    flat = a.set_scores(mass, np.add).ravel()[lat.set_at]
    alpha = np.zeros((n + 1, size))
    alpha[0, state] = 1.0
    forward = alpha.ravel()
    for i in range(n):
        at = lat.at(i)
        into = np.add.reduceat(forward[lat.from_[at]] * flat[at], lat.heads[i])
        alpha[i + 1, lat.targets[i]] = into / max(into.sum(), 1e-300)
    beta = np.empty((n + 1, size))
    beta[n] = end
    backward = beta.ravel()
    for i in range(n - 1, -1, -1):
        at = lat.at(i)
        b = np.bincount(lat.src[at], flat[at] * backward[lat.to[at]], minlength=size)
        beta[i] = b / max(b.max(), 1e-300)
    # Paths through each pair, less the pair's own mass (which varies by class): per class set.
    sets = len(a.set_starts)
    through = np.bincount(lat.set_at, forward[lat.from_] * backward[lat.to], minlength=n * sets).reshape(n, sets)
    marginal = mass * (through @ a.set_classes)
    return alpha, marginal / np.maximum(marginal.sum(axis=1, keepdims=True), 1e-300)


def marginal_entropy(marginal: np.ndarray, mass: np.ndarray, px: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each position's token distribution conditioned on acceptance.

    Within class ``k`` tokens keep their relative probabilities, so a token's conditioned
    probability is ``m_k p_v / w_k``; summing ``-q log q`` over a class needs only its
    mass ``w_k`` and ``sum(p_v x_v)``, since ``log p_v = x_v - lse``.
    """
    m, w = marginal, np.maximum(mass, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.where(m > 0, m * (px / w - lse[:, None]) + m * np.log(np.where(m > 0, m, 1.0) / w), 0.0)
    return np.maximum(-inner.sum(axis=1), 0.0)


def sample_path(automaton: Automaton, mass: np.ndarray, alpha: np.ndarray, end: np.ndarray,
                uniform: np.ndarray, end_uniform: float) -> tuple[np.ndarray, np.ndarray]:
    """A class sequence drawn from accepted paths (backward sampling), and per position the
    uniform number left over for drawing a token within its class."""
    a = automaton
    n = mass.shape[0]
    set_mass = a.set_scores(mass, np.add)
    q = _draw(alpha[n] * end, end_uniform)[0]
    path, rest = np.empty(n, dtype=np.int64), np.empty(n)
    for i in range(n - 1, -1, -1):
        pairs = a.pairs_into(q)
        j, u = _draw(alpha[i, a.pair_src[pairs]] * set_mass[i, a.pair_set[pairs]], float(uniform[i]))
        classes = a.classes_of(pairs[j])
        k, rest[i] = _draw(mass[i, classes], u)
        path[i], q = classes[k], int(a.pair_src[pairs[j]])
    return path, rest


def _draw(weights: np.ndarray, u: float) -> tuple[int, float]:
    """Inverse-CDF draw of an index by ``weights``, and ``u`` rescaled to the chosen interval (uniform again)."""
    cdf = np.cumsum(weights)
    total = cdf[-1]
    if not total > 0:
        raise ValueError("no accepted canvas: the automaton state cannot be completed")
    j = min(int(np.searchsorted(cdf, u * total, side="right")), len(cdf) - 1)
    low = cdf[j - 1] if j else 0.0
    width = cdf[j] - low
    return j, float(np.clip((u * total - low) / width, 0.0, 1.0 - 1e-12)) if width > 0 else 0.5


def tokens_in_classes(automaton: Automaton, path: np.ndarray, logits: np.ndarray, probs: np.ndarray | None = None,
                      rest: np.ndarray | None = None) -> np.ndarray:
    """Per position a token of its class: drawn by ``probs`` with ``rest``, or the most likely (no ``rest``)."""
    a, out = automaton, np.empty(len(path), dtype=np.int64)
    ends = np.append(a.starts[1:], len(a.order))
    for i, k in enumerate(path):
        members = a.order[a.starts[k] : ends[k]]
        if len(members) == 1:
            out[i] = members[0]
            continue
        cdf = None if rest is None else np.cumsum(probs[i, members].astype(np.float64))
        if cdf is None or not cdf[-1] > 0:
            out[i] = members[np.argmax(logits[i, members])]
        else:
            out[i] = members[min(int(np.searchsorted(cdf, rest[i] * cdf[-1], side="right")), len(members) - 1)]
    return out


@dataclass
class Guide:
    """One row's constraint over a canvas: the automaton's state at the canvas's start, the
    positions that count (the tokens still wanted, at most a canvas) and the tokens that may follow."""

    automaton: Automaton
    state: int
    positions: int
    tokens_after: int
    _lattice: Lattice | None = field(default=None, init=False, repr=False)

    @property
    def lattice(self) -> Lattice:
        if self._lattice is None:
            self._lattice = Lattice.build(self.automaton, self.state, self.positions)
        return self._lattice

    def argmax(self, logits: np.ndarray) -> np.ndarray:
        """The most probable accepted tokens for the counted positions (``logits`` ``[C, V]``)."""
        n = self.positions
        best = np.maximum.reduceat(np.take(logits[:n], self.automaton.order, axis=1), self.automaton.starts, axis=1)
        path, _ = viterbi(self.automaton, best.astype(np.float64), self.state, end_states(self.automaton, self.tokens_after),
                          self.lattice)
        return tokens_in_classes(self.automaton, path, logits[:n])

    def step(self, logits: np.ndarray, probs: np.ndarray, uniform: np.ndarray,
             end_uniform: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the counted positions: a sample of an accepted canvas, the most probable one, and
        each position's entropy conditioned on acceptance."""
        a, n = self.automaton, self.positions
        logits, probs = logits[:n], probs[:n]
        end = end_states(a, self.tokens_after)
        best, mass, px, lse = class_scores(a, logits, probs)
        path, _ = viterbi(a, best, self.state, end, self.lattice)
        argmax = tokens_in_classes(a, path, logits)
        alpha, marginal = forward_backward(a, mass, self.state, end, self.lattice)
        entropy = marginal_entropy(marginal, mass, px, lse)
        drawn, rest = sample_path(a, mass, alpha, end, uniform[:n], end_uniform)
        return tokens_in_classes(a, drawn, logits, probs, rest), argmax, entropy


_AUTOMATA: OrderedDict[tuple[int, str], Automaton] = OrderedDict()


def automaton_for(tokenizer, *, json_schema: Any = None, regex: str | None = None, vocab_size: int | None = None) -> Automaton:
    """The automaton of a JSON schema (``"json_object"`` for any JSON object) or a regex,
    compiled once per tokenizer and kept for the next requests (the last 16)."""
    if (json_schema is None) == (regex is None):
        raise ValueError("give either a JSON schema or a regex")
    if regex is not None and not isinstance(regex, str):
        raise ValueError("regex must be a string")
    pattern = regex if regex is not None else schema_regex(JSON_OBJECT if json_schema == "json_object" else json_schema)
    key = (id(tokenizer), pattern)
    if key not in _AUTOMATA:
        _AUTOMATA[key] = Automaton.build(pattern, tokenizer, vocab_size)
        while len(_AUTOMATA) > 16:
            _AUTOMATA.popitem(last=False)
    _AUTOMATA.move_to_end(key)
    return _AUTOMATA[key]
