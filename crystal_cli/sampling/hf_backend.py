"""The transformers backend: `model.generate` on batches of `parallel` sequences (left padding).

It is the reference implementation (same prompts, same grammar) and the fallback where llama.cpp is not
built. The grammar is llama.cpp's own engine on a vocabulary-only load of the base's GGUF (same token ids as
the transformers tokenizer), applied as a LogitsProcessor, so both backends enforce identical constraints;
the distance guard rides in the same processor (one GuardState per row, fed the same token texts), and a
row it leaves without a token is ended with end of text and reported as "no_room".
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from crystal_cli.sampling.guard import DistanceGuard, GuardSettings
from crystal_cli.sampling.llama_backend import Finished, Job, SamplingSettings
from crystal_cli.sampling.llama_ctypes import CandidateArray


def load_vocab_grammar(tokenizer_gguf: Path, gbnf: str):
    """(GrammarEngine, vocabulary-only LlamaModel) for masking transformers logits with the crystal grammar;
    the model's end_tokens are what HFSampler must stop on."""
    from crystal_cli.sampling.llama_backend import LlamaModel

    vocab_model = LlamaModel(tokenizer_gguf, vocab_only=True)
    return vocab_model.grammar(gbnf), vocab_model


class _GrammarProcessor:
    """LogitsProcessor: rows still generating get every grammar-rejected (and guard-masked) token at -inf."""

    def __init__(self, engine, batch: int, prompt_width: int, end_tokens: set[int], eos: int,
                 guard: DistanceGuard | None = None):
        self.engine = engine
        self.samplers = [engine.new_sampler() for _ in range(batch)]
        self.prompt_width = prompt_width
        self.end_tokens = end_tokens
        self.eos = eos
        self.done = [False] * batch
        self.guard = guard
        self.states = [guard.new_state() for _ in range(batch)] if guard is not None else None
        self.failed = [False] * batch
        self.candidates = CandidateArray(len(engine.shortlist))

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_width
        masked = torch.full_like(scores, float("-inf"))
        rows = scores.detach().float().cpu().numpy()
        shortlist = torch.as_tensor(self.engine.shortlist, dtype=torch.long, device=scores.device)
        for row, sampler in enumerate(self.samplers):
            if self.done[row]:
                masked[row] = scores[row]
                continue
            if step > 0:
                token = int(input_ids[row, -1])
                if token in self.end_tokens:
                    self.done[row] = True
                    masked[row] = scores[row]
                    continue
                self.engine.accept(sampler, token)
                if self.states is not None:
                    self.states[row].accept(self.guard.pieces[token])
            allowed = self.engine.mask(sampler, self.candidates, rows[row])
            if self.states is not None and self.states[row].checking:
                open_ = np.flatnonzero(np.isfinite(allowed))
                keep = self.states[row].allowed(self.engine.shortlist[open_])
                allowed[open_[~keep]] = -np.inf
                if not keep.any():  # no room: end the row here
                    self.failed[row] = True
                    masked[row, self.eos] = 0.0
                    continue
            masked[row, shortlist] = torch.as_tensor(allowed, dtype=scores.dtype, device=scores.device)
        return masked

    def masked_counts(self) -> list[int]:
        return [state.masked for state in self.states] if self.states is not None else [0] * len(self.samplers)

    def close(self) -> None:
        import llama_cpp

        for sampler in self.samplers:
            llama_cpp.llama_sampler_free(sampler)


class HFSampler:
    """Draws samples of one prompt with transformers, `parallel` at a time."""

    def __init__(self, model, tokenizer, settings: SamplingSettings, grammar=None, end_tokens: Sequence[int] = (),
                 guard: GuardSettings | None = None, pieces: Sequence[str] | None = None):
        if guard is not None and (grammar is None or pieces is None):
            raise ValueError("the distance guard needs the grammar and the vocabulary's token texts")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.grammar = grammar  # a GrammarEngine on the same vocabulary, or None
        # every end-of-generation token llama.cpp knows (<|endoftext|> as well as eos), as the grammar allows them
        self.end_tokens = sorted(set(end_tokens) | {tokenizer.eos_token_id})
        self.guard = DistanceGuard(guard, pieces) if guard is not None else None

    def run(self, prompt: str, jobs: Sequence[Job]) -> Iterator[Finished]:
        import torch

        settings = self.settings
        end_tokens = set(self.end_tokens)
        self.tokenizer.padding_side = "left"
        for start in range(0, len(jobs), settings.parallel):
            chunk = jobs[start : start + settings.parallel]
            encoded = self.tokenizer([prompt] * len(chunk), return_tensors="pt", padding=True)
            width = encoded["input_ids"].shape[1]
            processors = []
            if self.grammar is not None:
                processors.append(_GrammarProcessor(self.grammar, len(chunk), width, end_tokens,
                                                    self.tokenizer.eos_token_id, self.guard))
            sampling = settings.temperature > 0
            options = {"do_sample": sampling, "max_new_tokens": settings.max_new_tokens,
                       "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.end_tokens}
            if sampling:
                options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            started = time.perf_counter()
            torch.manual_seed(chunk[0].seed)
            try:
                with torch.inference_mode():
                    output = self.model.generate(**encoded, logits_processor=processors, **options)
            finally:
                for processor in processors:
                    processor.close()
            seconds = time.perf_counter() - started
            failed = processors[0].failed if processors else [False] * len(chunk)
            masked = processors[0].masked_counts() if processors else [0] * len(chunk)
            for k, (job, row) in enumerate(zip(chunk, output[:, width:].tolist())):
                ends = [i for i, token in enumerate(row) if token in end_tokens]
                body = row[: ends[0]] if ends else row
                text = self.tokenizer.decode(body, skip_special_tokens=False)
                ended = bool(ends) and not failed[k]
                yield Finished(job.index, job.seed, text, len(body) + ended, seconds, ended,
                               "no_room" if failed[k] else "", masked[k])


def score_continuations(model, tokenizer, prompt: str, continuations: Sequence[Sequence[int]], parallel: int = 32) -> list[float]:
    """log P(continuation + eos | prompt) for each token sequence (right-padded batches)."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    scores: list[float] = []
    for start in range(0, len(continuations), parallel):
        chunk = [list(c) + [eos] for c in continuations[start : start + parallel]]
        width = len(prompt_ids) + max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            row = prompt_ids + c
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, c in enumerate(chunk):
            positions = np.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(c))
            scores.append(float(logprobs[i, positions, torch.tensor(c)].sum()))
    return scores
