"""Batched sampling with llama.cpp's low-level API: many sequences decoded in one batch.

The prompt is decoded once and its KV cells copied to every slot; each slot then runs one sequence with its
own sampler chain (grammar -> temperature -> top-p -> seeded dist). Slots are refilled as soon as their
sequence ends (continuous batching), so the batch stays full while there is work, and finished samples are
yielded at once so the caller can append them to disk. A stream of requests (`run_requests`: a prompt,
grammar and guard each, e.g. one formula-conditioned target of `crystal flow pairs` per request) shares the
same slots; a slot that takes another prompt's job decodes that prompt into its own cells first.

Under a grammar, about half the tokens of crystal text are forced (the "0." of every coordinate, the spaces
between them, the newline after an element symbol): when the grammar admits exactly one next token it is
appended without sampling and decoded without logits. The sampled distribution is unchanged (a forced token
has probability 1 under the masked distribution); the vocabulary projection and the sampler chain are
skipped for every forced token.

With a distance guard (sampling/guard.py) each sequence also carries a GuardState: after every appended
token it masks the grammar-allowed tokens that would leave no far-enough position (that set is what the
forced-token check computes anyway), the sampled token is drawn with those at -inf, a token the two leave
alone is forced like any other, and a sequence with no token left ends as the failure "no_room".

Every decode holds exactly one token of each running sequence, and running sequences always occupy slots
0..k-1 (a slot that empties while others still run takes over the highest one's KV cells). Both matter:
with one KV stream per sequence llama.cpp splits a batch into micro-batches of *consecutive* sequence ids
with *equal* token counts, and each micro-batch reads every weight again. Ragged runs of forced tokens or a
gap in the slot ids cut one decode into many; measured on 2 AVX2 cores, that cost more than the skipped work
saved.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystal_cli.errors import CrystalError
from crystal_cli.grammar import crystal_shortlist
from crystal_cli.runtime import idle_cores, quiet_llama_cpp
from crystal_cli.sampling.guard import DistanceGuard, GuardSettings, GuardState
from crystal_cli.sampling.llama_ctypes import CandidateArray, GrammarEngine


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    parallel: int = 32  # sequences decoded at once
    threads: int | None = None  # None: every core
    skip_forced: bool = True  # append grammar-forced tokens without sampling (llama.cpp backend)


@dataclass(frozen=True)
class Job:
    """One sample to draw: its index in the run (names it, seeds it)."""

    index: int
    seed: int


@dataclass
class Finished:
    index: int
    seed: int
    text: str
    tokens: int
    seconds: float
    ended: bool  # False when max_new_tokens cut it off, or on a failure
    failure: str = ""  # "no_room": the distance guard left no token
    guard_masked: int = 0  # grammar-allowed tokens the distance guard masked, summed over the steps


def job_seed(seed: int, index: int) -> int:
    """A per-sample seed that depends only on (run seed, sample index): resumed runs draw new samples."""
    # 0xFFFFFFFF is llama.cpp's "pick a random seed"; never hand it out
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0]) % 0xFFFFFFFF


class LlamaModel:
    """A GGUF model (optionally with a GGUF LoRA adapter) loaded for batched decoding."""

    def __init__(self, path: str | Path, adapter: str | Path | None = None, threads: int | None = None,
                 vocab_only: bool = False):
        llama = quiet_llama_cpp()
        self._llama = llama
        self.path = Path(path)
        self.threads = threads or idle_cores()  # every idle core; spinning threads collapse on a busy one
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.vocab_only = vocab_only
        self.model = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise CrystalError(f"{self.path}: llama.cpp could not load this GGUF as a model")
        self.adapter = None
        if adapter is not None:
            self.adapter = llama.llama_adapter_lora_init(self.model, str(adapter).encode())
            if not self.adapter:
                raise CrystalError(f"{adapter}: llama.cpp could not load this GGUF LoRA adapter on {self.path.name}")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self.end_tokens = [t for t in range(self.n_vocab) if llama.llama_vocab_is_eog(self.vocab, t)]
        self._pieces: list[bytes] | None = None
        self._shortlist: np.ndarray | None = None

    # ------------------------------------------------------------------------------------ vocabulary

    def piece_texts(self) -> list[str]:
        """The text of every token (what the distance guard reads)."""
        return [p.decode("utf-8", errors="replace") for p in self.pieces]

    @property
    def pieces(self) -> list[bytes]:
        """The bytes of every token (control tokens are empty)."""
        if self._pieces is None:
            buffer = ctypes.create_string_buffer(256)
            pieces = []
            for token in range(self.n_vocab):
                n = self._llama.llama_token_to_piece(self.vocab, token, buffer, 256, 0, False)
                pieces.append(buffer.raw[: max(n, 0)])
            self._pieces = pieces
        return self._pieces

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        tokens = (self._llama.llama_token * capacity)()
        n = self._llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, False)
        if n < 0:
            raise ValueError(f"tokenizing needs {-n} tokens")
        return list(tokens[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        pieces = self.pieces
        return b"".join(pieces[t] for t in tokens).decode("utf-8", errors="replace")

    def grammar(self, gbnf: str) -> GrammarEngine:
        if self._shortlist is None:
            self._shortlist = crystal_shortlist(self.piece_texts(), self.end_tokens)
        return GrammarEngine(self.vocab, gbnf, self._shortlist)

    # -------------------------------------------------------------------------------------- contexts

    def context(self, n_ctx: int, n_seq: int, n_batch: int, unified: bool):
        llama = self._llama
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.kv_unified = unified
        params.no_perf = True
        ctx = llama.llama_init_from_model(self.model, params)
        if not ctx:
            raise CrystalError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens × {n_seq} sequences")
        if self.adapter is not None:
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
                raise CrystalError(f"{self.path}: could not apply the LoRA adapter")
        return ctx

    def close(self) -> None:
        if self.adapter:
            self._llama.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.model:
            self._llama.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Batch:
    """A llama_batch of one token per row with numpy views of its arrays."""

    def __init__(self, llama, capacity: int):
        self._llama = llama
        self.batch = llama.llama_batch_init(capacity, 0, 1)
        self.token = np.ctypeslib.as_array(self.batch.token, (capacity,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, (capacity,))
        self.n_seq_id = np.ctypeslib.as_array(self.batch.n_seq_id, (capacity,))
        self.logits = np.ctypeslib.as_array(self.batch.logits, (capacity,))
        self.seq_id = [self.batch.seq_id[i] for i in range(capacity)]

    def fill(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]) -> None:
        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.n_seq_id[:n] = 1
        self.logits[:n] = logits
        for i, s in enumerate(seqs):
            self.seq_id[i][0] = s
        self.batch.n_tokens = n

    def free(self) -> None:
        self._llama.llama_batch_free(self.batch)


def _decode(llama, ctx, batch: _Batch, n_vocab: int, n_outputs: int) -> np.ndarray:
    status = llama.llama_decode(ctx, batch.batch)
    if status != 0:
        raise RuntimeError(f"llama_decode failed with status {status}")
    if n_outputs == 0:
        return np.empty((0, n_vocab), dtype=np.float32)
    return np.ctypeslib.as_array(llama.llama_get_logits(ctx), (n_outputs, n_vocab))


@dataclass
class _Slot:
    job: Job
    request: Request
    chain: object
    started: float
    n_prompt: int  # the request's prompt tokens ahead of the sequence in the slot's cells
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    decoded: int = 0  # tokens[:decoded] are in the KV cache
    guard: GuardState | None = None
    banned: np.ndarray | None = None  # shortlist positions the guard masks at the next sampled token
    failure: str = ""


@dataclass
class Request:
    """Jobs that share a prompt, a grammar and a distance guard: a formula-conditioned target of `crystal flow
    pairs` is one. `max_new_tokens` (None: the sampler's setting) caps its sequences; a grammar the request
    owns is closed once its last job has finished."""

    prompt: str
    jobs: Sequence[Job]
    grammar: GrammarEngine | None = None
    guard: DistanceGuard | None = None
    max_new_tokens: int | None = None
    owns_grammar: bool = False


class BatchedSampler:
    """Draws many samples with `parallel` sequences in flight: of one prompt (`run`), or of a stream of
    requests with prompts and grammars of their own (`run_requests`), one slot per job."""

    def __init__(self, model: LlamaModel, settings: SamplingSettings, gbnf: str | None,
                 guard: GuardSettings | None = None):
        if guard is not None and not gbnf:
            raise ValueError("the distance guard reads grammatical text: it needs the grammar")
        self.model = model
        self.settings = settings
        self.grammar = model.grammar(gbnf) if gbnf else None
        self.guard = self.distance_guard(guard)
        self._shortlist: np.ndarray | None = None  # the model's crystal shortlist, what every grammar samples over
        self._position: np.ndarray | None = None  # token id -> index in the shortlist
        self._zeros: np.ndarray | None = None

    def distance_guard(self, guard: GuardSettings | None) -> DistanceGuard | None:
        """GuardSettings on this model's vocabulary (None: no guard)."""
        return DistanceGuard(guard, self.model.piece_texts()) if guard is not None else None

    def _candidate_ids(self, grammar: GrammarEngine | None) -> np.ndarray:
        if grammar is None:
            return np.arange(self.model.n_vocab, dtype=np.int32)
        if self._shortlist is None:
            self._shortlist = grammar.shortlist
            self._position = np.full(self.model.n_vocab, -1, dtype=np.int64)
            self._position[self._shortlist] = np.arange(len(self._shortlist))
            self._zeros = np.zeros(len(self._shortlist), dtype=np.float32)
        return self._shortlist

    def _chain(self, seed: int, grammar: GrammarEngine | None):
        llama = self.model._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if grammar is not None:
            llama.llama_sampler_chain_add(chain, grammar.new_sampler())
        if self.settings.temperature <= 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        else:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(self.settings.temperature))
            if self.settings.top_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(self.settings.top_p, 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def _sample(self, slot: _Slot, candidates: CandidateArray, row: np.ndarray) -> int:
        llama = self.model._llama
        ids = self._candidate_ids(slot.request.grammar)
        candidates.load(ids, row[ids] if slot.request.grammar is not None else row)
        if slot.banned is not None:
            candidates.buffer["logit"][slot.banned] = -np.inf
        llama.llama_sampler_apply(slot.chain, candidates.pointer)
        token = candidates.selected_token()
        llama.llama_sampler_accept(slot.chain, token)
        return token

    def _allowed(self, slot: _Slot, candidates: CandidateArray) -> np.ndarray:
        """Token ids the slot's grammar allows next, less those its guard masks (recorded in slot.banned;
        none left: slot.failure)."""
        llama = self.model._llama
        ids = self._candidate_ids(slot.request.grammar)
        candidates.load(ids, self._zeros)
        llama.llama_sampler_apply(llama.llama_sampler_chain_get(slot.chain, 0), candidates.pointer)
        allowed = candidates.view()
        allowed = allowed["id"][np.isfinite(allowed["logit"])]
        slot.banned = None
        if slot.guard is not None and slot.guard.checking:
            keep = slot.guard.allowed(allowed)
            if not keep.any():
                slot.failure = "no_room"
            elif not keep.all():
                slot.banned = self._position[allowed[~keep]]
            allowed = allowed[keep]
        return allowed

    def _extend(self, slot: _Slot, candidates: CandidateArray, row: np.ndarray, end_tokens: set[int]) -> None:
        """Sample slot's next token from `row`, then append the tokens the grammar (and guard) force after it."""
        slot.tokens.append(self._sample(slot, candidates, row))
        slot.banned = None
        skip_forced = self.settings.skip_forced
        if slot.request.grammar is None or not (skip_forced or slot.guard is not None):
            return
        pieces = slot.request.guard.pieces if slot.guard is not None else None
        while slot.tokens[-1] not in end_tokens and len(slot.tokens) < slot.max_new_tokens:
            if slot.guard is not None:
                slot.guard.accept(pieces[slot.tokens[-1]])
                if not skip_forced and not slot.guard.checking:
                    return
            allowed = self._allowed(slot, candidates)
            if not skip_forced or len(allowed) != 1:
                return
            token = int(allowed[0])
            self.model._llama.llama_sampler_accept(slot.chain, token)
            slot.tokens.append(token)
            slot.banned = None

    def run(self, prompt: str, jobs: Sequence[Job]) -> Iterator[Finished]:
        """Yields each sample as it finishes (not in job order)."""
        request = Request(prompt, jobs, self.grammar, self.guard)
        for _, finished in self.run_requests([request], len(jobs), len(self.model.tokenize(prompt))):
            yield finished

    def run_requests(self, requests: Iterable[Request], n_jobs: int, max_prompt: int,
                     max_new_tokens: int | None = None) -> Iterator[tuple[Request, Finished]]:
        """(request, sample) of each job as it finishes. `requests` is read lazily (a grammar per request is
        compiled only when its turn comes); `n_jobs` (all requests together) sizes the batch, `max_prompt` and
        `max_new_tokens` (None: the setting) the longest prompt and sequence, in tokens. The first request's
        prompt is decoded once and copied into every slot; a slot that takes a job of another prompt decodes
        that prompt into its own cells first (one decode of that sequence alone)."""
        llama, model, settings = self.model._llama, self.model, self.settings
        if n_jobs <= 0:
            return
        longest = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        n_slots = max(1, min(settings.parallel, n_jobs))
        per_seq = -(-(max_prompt + longest + 1) // 256) * 256  # llama.cpp pads contexts to 256
        ctx = model.context(per_seq * n_slots, n_slots, max(max_prompt, n_slots), unified=False)
        batch = _Batch(llama, max(max_prompt, n_slots))
        candidates = CandidateArray(model.n_vocab)
        end_tokens = set(model.end_tokens)
        stream = iter(requests)
        queue: list[tuple[Request, Job]] = []
        remaining: dict[int, list] = {}  # id(request) -> [request, its jobs not yet finished]
        prompts: dict[int, tuple[str, list[int], np.ndarray]] = {}  # slot -> (prompt, tokens, logits) in its cells
        slots: dict[int, _Slot] = {}
        memory = llama.llama_get_memory(ctx)

        def next_job() -> tuple[Request, Job] | None:
            while not queue:
                request = next(stream, None)
                if request is None:
                    return None
                if request.jobs:
                    remaining[id(request)] = [request, len(request.jobs)]
                    queue.extend((request, job) for job in reversed(request.jobs))
                else:
                    _release(request)
            return queue.pop()

        def load_prompt(s: int, prompt: str) -> tuple[list[int], np.ndarray]:
            """The prompt's tokens and last logits, its KV cells in slot s (decoded there unless they are)."""
            if s in prompts and prompts[s][0] == prompt:
                return prompts[s][1], prompts[s][2]
            tokens = model.tokenize(prompt)
            if len(tokens) > max_prompt:
                raise ValueError(f"a prompt of {len(tokens)} tokens, more than max_prompt = {max_prompt}")
            llama.llama_memory_seq_rm(memory, s, -1, -1)
            batch.fill(tokens, range(len(tokens)), [s] * len(tokens), [False] * (len(tokens) - 1) + [True])
            logits = _decode(llama, ctx, batch, model.n_vocab, 1)[0].copy()
            prompts[s] = (prompt, tokens, logits)
            return tokens, logits

        def start(s: int, request: Request, job: Job) -> None:
            tokens, logits = load_prompt(s, request.prompt)
            limit = longest if request.max_new_tokens is None else min(request.max_new_tokens, longest)
            slot = _Slot(job, request, self._chain(job.seed, request.grammar), time.perf_counter(), len(tokens), limit)
            if request.guard is not None:
                slot.guard = request.guard.new_state()
                if slot.guard.checking:
                    self._allowed(slot, candidates)
            if not slot.failure:
                self._extend(slot, candidates, logits, end_tokens)
            slots[s] = slot

        def finish(s: int, ended: bool) -> tuple[Request, Finished]:
            slot = slots.pop(s)
            llama.llama_sampler_free(slot.chain)
            llama.llama_memory_seq_rm(memory, s, slot.n_prompt, -1)
            body = slot.tokens[:-1] if ended else slot.tokens
            request = slot.request
            remaining[id(request)][1] -= 1
            if not remaining[id(request)][1]:
                del remaining[id(request)]
                _release(request)
            return request, Finished(slot.job.index, slot.job.seed, model.detokenize(body), len(slot.tokens),
                                     time.perf_counter() - slot.started, ended, slot.failure,
                                     slot.guard.masked if slot.guard is not None else 0)

        def compact() -> None:
            """Move the highest running slots into the empty ones below them (a KV stream copy each)."""
            holes = [s for s in range(len(slots)) if s not in slots]
            movers = sorted((s for s in slots if s >= len(slots)), reverse=True)
            for hole, mover in zip(holes, movers):
                llama.llama_memory_seq_rm(memory, hole, -1, -1)
                llama.llama_memory_seq_cp(memory, mover, hole, -1, -1)
                llama.llama_memory_seq_rm(memory, mover, -1, -1)
                slots[hole] = slots.pop(mover)
                prompts[hole] = prompts.pop(mover)

        try:
            first = next_job()
            if first is None:
                return
            tokens, _ = load_prompt(0, first[0].prompt)
            for s in range(1, n_slots):
                llama.llama_memory_seq_cp(memory, 0, s, -1, -1)
                prompts[s] = prompts[0]
            queue.append(first)
            for s in range(n_slots):
                work = next_job()
                if work is None:
                    break
                start(s, *work)
            while slots:
                while True:  # again while a refilled slot is over at once (the guard found no room)
                    done = [s for s, slot in slots.items() if not slot.failure and slot.tokens[-1:] and
                            slot.tokens[-1] in end_tokens]
                    done_cut = [s for s, slot in slots.items() if s not in done and
                                (slot.failure or len(slot.tokens) >= slot.max_new_tokens)]
                    if not done and not done_cut:
                        break
                    for s in done + done_cut:
                        yield finish(s, s in done)
                        work = next_job()
                        if work is not None:
                            start(s, *work)
                if not slots:
                    break
                compact()
                active = range(len(slots))
                sampling = [s for s in active if slots[s].decoded == len(slots[s].tokens) - 1]
                batch.fill([slots[s].tokens[slots[s].decoded] for s in active],
                           [slots[s].n_prompt + slots[s].decoded for s in active], active,
                           [slots[s].decoded == len(slots[s].tokens) - 1 for s in active])
                for s in active:
                    slots[s].decoded += 1
                logits = _decode(llama, ctx, batch, model.n_vocab, len(sampling))
                for row, s in enumerate(sampling):
                    self._extend(slots[s], candidates, logits[row], end_tokens)
        finally:
            for slot in slots.values():
                llama.llama_sampler_free(slot.chain)
            for request, _ in remaining.values():
                _release(request)
            batch.free()
            llama.llama_free(ctx)

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()


def _release(request: Request) -> None:
    if request.owns_grammar and request.grammar is not None:
        request.grammar.close()


def log_softmax(row: np.ndarray) -> np.ndarray:
    shifted = row.astype(np.float64) - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def score_continuations(model: LlamaModel, prompt: str, continuations: Sequence[Sequence[int]], parallel: int = 32) -> list[float]:
    """log P(continuation + end of text | prompt) for each token sequence, sharing the prompt's KV cells."""
    llama = model._llama
    prompt_tokens = model.tokenize(prompt)
    n_prompt = len(prompt_tokens)
    eos = llama.llama_vocab_eos(model.vocab)
    width = max((len(c) for c in continuations), default=0)
    n_seq = max(1, min(parallel, len(continuations)))
    capacity = max(n_prompt, n_seq * width, 1)
    ctx = model.context(n_prompt + n_seq * width + 8, n_seq + 1, capacity, unified=True)
    batch = _Batch(llama, capacity)
    scores: list[float] = []
    try:
        batch.fill(prompt_tokens, range(n_prompt), [0] * n_prompt, [False] * (n_prompt - 1) + [True])
        first = log_softmax(_decode(llama, ctx, batch, model.n_vocab, 1)[0])
        memory = llama.llama_get_memory(ctx)
        for start in range(0, len(continuations), n_seq):
            chunk = continuations[start : start + n_seq]
            tokens, positions, seqs = [], [], []
            for k, continuation in enumerate(chunk):
                llama.llama_memory_seq_cp(memory, 0, k + 1, -1, -1)
                tokens += continuation
                positions += range(n_prompt, n_prompt + len(continuation))
                seqs += [k + 1] * len(continuation)
            batch.fill(tokens, positions, seqs, [True] * len(tokens))
            logits = _decode(llama, ctx, batch, model.n_vocab, len(tokens)) if tokens else np.zeros((0, model.n_vocab))
            row = 0
            for continuation in chunk:
                total, previous = 0.0, first
                for token in continuation:
                    total += previous[token]
                    previous = log_softmax(logits[row])
                    row += 1
                scores.append(float(total + previous[eos]))
            for k in range(len(chunk)):
                llama.llama_memory_seq_rm(memory, k + 1, -1, -1)
    finally:
        batch.free()
        llama.llama_free(ctx)
    return scores
