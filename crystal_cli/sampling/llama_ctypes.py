"""llama.cpp's token-data array and grammar sampler through llama_cpp's ctypes bindings, for both backends.

The llama.cpp backend samples with them; the transformers backend masks its logits with the same grammar
sampler on a vocabulary-only load, so both enforce identical constraints. The grammar runs only on the
shortlist of grammar.crystal_shortlist (a few hundred of 49,152 tokens; every other token would be rejected
anyway, so the masked distribution is exact), which keeps it cheap.
"""

from __future__ import annotations

import ctypes

import numpy as np

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data, 12 bytes


class CandidateArray:
    """A reusable llama_token_data_array over a numpy buffer: samplers run on it in place."""

    def __init__(self, capacity: int):
        import llama_cpp

        self.buffer = np.zeros(capacity, dtype=TOKEN_DATA)
        self._data = ctypes.cast(self.buffer.ctypes.data, llama_cpp.llama_token_data_p)
        self.array = llama_cpp.llama_token_data_array(self._data, 0, -1, False)
        self.pointer = ctypes.byref(self.array)

    def load(self, ids: np.ndarray, logits: np.ndarray) -> None:
        n = len(ids)
        self.buffer["id"][:n] = ids
        self.buffer["logit"][:n] = logits
        self.buffer["p"][:n] = 0.0
        self.array.data = self._data  # samplers may repoint it
        self.array.size = n
        self.array.selected = -1
        self.array.sorted = False

    def selected_token(self) -> int:
        return int(self.array.data[self.array.selected].id)

    def view(self) -> np.ndarray:
        """The (possibly reordered, masked) candidates after a sampler ran."""
        size = int(self.array.size)
        address = ctypes.cast(self.array.data, ctypes.c_void_p).value
        if address == self.buffer.ctypes.data:
            return self.buffer[:size]
        return np.ctypeslib.as_array(ctypes.cast(self.array.data, ctypes.POINTER(ctypes.c_uint8)), (size * 12,)).view(
            TOKEN_DATA
        )


class GrammarEngine:
    """One GBNF grammar compiled for one llama.cpp vocabulary; hands out per-sequence grammar samplers."""

    def __init__(self, vocab, gbnf: str, shortlist: np.ndarray):
        import llama_cpp

        self._llama = llama_cpp
        self.shortlist = shortlist
        self._template = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._template:
            raise ValueError("llama.cpp rejected the crystal grammar")

    def new_sampler(self):
        """A fresh grammar sampler at the start of the text (caller frees it, or a chain takes it over)."""
        return self._llama.llama_sampler_clone(self._template)

    def mask(self, sampler, candidates: CandidateArray, logits_row: np.ndarray) -> np.ndarray:
        """Shortlist logits with every token the grammar rejects at -inf (shortlist order)."""
        candidates.load(self.shortlist, logits_row[self.shortlist])
        self._llama.llama_sampler_apply(sampler, candidates.pointer)
        return candidates.view()["logit"].copy()

    def accept(self, sampler, token: int) -> None:
        self._llama.llama_sampler_accept(sampler, token)

    def close(self) -> None:
        if self._template:
            self._llama.llama_sampler_free(self._template)
            self._template = None

    def __del__(self) -> None:
        self.close()
