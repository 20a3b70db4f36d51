"""Picking one answer out of N candidates.

Candidates are ``answers [N, B, S]`` (N trajectories for each of B inputs) with the LPRM ``value [N, B]``
and ``halt_logit [N, B]`` of each (the fields of :class:`gram_pyro.inference.Trajectories`). Every
selector has the signature ``(answers, value=None, halt_logit=None) -> (selected [B, S], index [B])``
where ``index`` is the chosen trajectory of each input; ties are broken deterministically:

* :func:`majority_vote`: the answer given by the most trajectories; among answers with equal counts the
  one that occurs first (lowest trajectory index); ``index`` is that first occurrence. Its working
  memory is linear in the candidates and bounded by a memory budget (inputs are counted in blocks).
* :func:`lprm_best`: the highest LPRM value (best-of-N), lowest index among equal maxima.
* :func:`halt_best`: the highest halt logit (PTRM's rule), lowest index among equal maxima.
* :func:`first`: trajectory 0 (what a single sample would give).

* ``smc``: the vote among the survivors of test-time SMC (:mod:`gram_pyro.test_time_smc`), whose
  resampling has already weighed the trajectories by the value or halt head: the candidates it is given
  are those survivors (``gram-pyro eval select=smc`` draws them instead of independent trajectories).

:data:`SELECTORS` maps the names ``vote``, ``lprm``, ``halt``, ``first``, ``smc`` to them; :func:`select`
looks one up by name. The width of a candidate set is measured by the task: coverage@N from per-answer
solution ids (:func:`gram_pyro.tasks.base.coverage_at_n`), and pass@N (some candidate correct) in
:func:`gram_pyro.evaluation.evaluate_run`.
"""

from __future__ import annotations

import torch

from gram_pyro.config import UserError


def _gather(answers: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``answers[index[b], b]`` for every input: ``[N, B, S]``, ``[B]`` -> ``[B, S]``."""
    return answers.gather(0, index[None, :, None].expand(1, *answers.shape[1:]))[0]


def _answer_ids(answers: torch.Tensor) -> torch.Tensor:
    """Integer ids ``[N, B]`` with equal ids exactly where the answers ``[N, B, S]`` are equal."""
    return torch.unique(answers.flatten(0, 1), dim=0, return_inverse=True)[1].view(answers.shape[:2])


VOTE_BYTES = (16, 256)
"""Peak working memory of the vote per answer token and per candidate, in bytes: the ``int64`` answers
of a block, :func:`torch.unique`'s sorted copy and index buffers (measured on CPU: 13 per token plus
220 per candidate), with a margin."""


def vote_inputs_per_block(answers: torch.Tensor, memory_budget_mb: float | None) -> int:
    """How many inputs (columns of ``answers [N, B, S]``) :func:`majority_vote` counts at once so that
    its working memory (:data:`VOTE_BYTES`) fits ``memory_budget_mb``: at least one, all where the
    budget is ``None``."""
    if memory_budget_mb is None:
        return max(answers.shape[1], 1)
    per_token, per_candidate = VOTE_BYTES
    per_input = answers.shape[0] * (answers.shape[2] * per_token + per_candidate)
    return max(1, int(memory_budget_mb * 2**20 // per_input))


def _best(answers: torch.Tensor, score: torch.Tensor | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate with the highest ``score [N, B]`` (first maximum)."""
    if score is None:
        raise ValueError(f"this selector needs the candidates' {what}")
    index = score.argmax(0)  # torch.argmax returns the first of equal maxima
    return _gather(answers, index), index


def majority_vote(answers: torch.Tensor, value: torch.Tensor | None = None,
                  halt_logit: torch.Tensor | None = None, memory_budget_mb: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The most frequent answer of each input. ``count[i, b]``, how many candidates of input ``b`` equal
    candidate ``i``, comes from counting each distinct (answer, input) pair once (memory linear in the
    candidates, never ``N x N``), a block of inputs at a time that fits ``memory_budget_mb``
    (:func:`vote_inputs_per_block`); the first maximal count is the first occurrence of a most frequent
    answer, and of the earliest such answer on ties."""
    index = answers.new_empty(answers.shape[1], dtype=torch.long)
    step = vote_inputs_per_block(answers, memory_budget_mb)
    for start in range(0, answers.shape[1], step):
        block = answers[:, start:start + step]
        pairs = _answer_ids(block) * block.shape[1] + torch.arange(block.shape[1], device=block.device)
        _, inverse, counts = torch.unique(pairs, return_inverse=True, return_counts=True)
        index[start:start + step] = counts[inverse].argmax(0)
    return _gather(answers, index), index


def lprm_best(answers: torch.Tensor, value: torch.Tensor | None = None,
              halt_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-N by the LPRM value."""
    return _best(answers, value, "LPRM value")


def halt_best(answers: torch.Tensor, value: torch.Tensor | None = None,
              halt_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-N by the halt logit (PTRM's selection rule)."""
    return _best(answers, halt_logit, "halt logit")


def first(answers: torch.Tensor, value: torch.Tensor | None = None,
          halt_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first candidate."""
    return answers[0], answers.new_zeros(answers.shape[1])


SELECTORS = {"vote": majority_vote, "lprm": lprm_best, "halt": halt_best, "first": first, "smc": majority_vote}


def select(name: str, answers: torch.Tensor, value: torch.Tensor | None = None,
           halt_logit: torch.Tensor | None = None, memory_budget_mb: float | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the selector called ``name`` (a key of :data:`SELECTORS`); ``memory_budget_mb`` bounds the
    vote's working memory (``None``: all inputs at once)."""
    if name not in SELECTORS:
        raise UserError(f"unknown selector {name!r}; allowed: {', '.join(SELECTORS)}")
    if SELECTORS[name] is majority_vote:
        return majority_vote(answers, memory_budget_mb=memory_budget_mb)
    return SELECTORS[name](answers, value, halt_logit)

