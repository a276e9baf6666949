"""Choosing the next token from a step's logits: greedy, or sampled with temperature, top-k and top-p.

Given logits z [vocab] (computed in fp32 whatever the model's dtype):

- greedy (temperature 0): next = argmax_i z_i.
- sampled: p_i = softmax(z / T)_i, then
  - top-k keeps the k tokens of largest p (k = 0: all; tokens tied with the k-th are kept too),
  - top-p (nucleus) keeps the smallest set of most likely tokens whose mass reaches top_p:
    sort p descending, keep token j while the mass of the tokens before it is < top_p
    (so the most likely token is always kept; top_p = 1: all),
  - the kept p are renormalised to sum 1 and one token is drawn with a torch.Generator.

A seeded generator makes sampled generation reproducible: the same seed, logits and device
give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neoxfuse.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding.

    temperature: 0 for greedy, else > 0 (logits are divided by it before the softmax).
    top_k: keep the k most likely tokens; 0 keeps all.
    top_p: keep the smallest most-likely set with mass >= top_p, in (0, 1]; 1 keeps all.
    seed: seeds the generator that draws tokens; None draws from a random seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise InvalidInputError(f"temperature must be >= 0 and finite (0 means greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidInputError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """The generator that draws tokens on `device` (None for greedy decoding, which draws nothing)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(z / T), top-k and top-p filtered, renormalised.

    logits: [vocab] (any float dtype). Returns fp32 probabilities [vocab], zero outside the kept set.
    """
    if params.greedy:
        raise InvalidInputError("greedy decoding (temperature 0) has no distribution to draw from; use argmax")
    if logits.dim() != 1:
        raise InvalidInputError(f"logits must have shape [vocab], got {list(logits.shape)}")
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [vocab]
    if params.top_k and params.top_k < probs.numel():
        kth_largest = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth_largest, probs, torch.zeros_like(probs))
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)  # [vocab], [vocab]
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # [vocab]
        keep_sorted = mass_before < params.top_p * sorted_probs.sum()  # the first token is always kept
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)  # [vocab]
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token id as a [1] long tensor on the logits' device, without waiting for the device:
    argmax(logits) when greedy, else one draw from `probabilities(logits, params)`.

    logits: [vocab]; generator: from `params.generator(logits.device)`, on the logits' device.
    """
    if params.greedy:
        return torch.argmax(logits).reshape(1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """choose(logits, params, generator) as a Python int (waits for the device)."""
    return int(choose(logits, params, generator))
