"""Selection rules (vote, LPRM, halt, first) on hand-made candidates."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram_pyro.config import UserError
from gram_pyro.selection import (SELECTORS, VOTE_BYTES, first, halt_best, lprm_best, majority_vote, select,
                                 vote_inputs_per_block)

A, B, C = [1, 2, 2], [2, 1, 2], [2, 2, 1]


def candidates(*columns):
    """``answers [N, len(columns), 3]`` from one list of answers per input."""
    return torch.tensor(columns).transpose(0, 1)


def test_vote_picks_the_most_frequent_answer_and_its_first_occurrence():
    answers = candidates([A, B, C, B, A, B], [C, A, A, B, B, A])
    selected, index = majority_vote(answers)
    assert selected.tolist() == [B, A]
    assert index.tolist() == [1, 1]


def test_vote_breaks_equal_counts_by_the_earliest_answer():
    answers = candidates([C, A, B, A, C, B], [B, B, A, A, C, C])
    selected, index = majority_vote(answers)
    assert selected.tolist() == [C, B]
    assert index.tolist() == [0, 0]


def test_vote_counts_whole_answers_not_tokens():
    # token-wise majority would give [2, 2, 2], which no candidate proposed
    selected, index = majority_vote(candidates([A, B, C, C]))
    assert selected.tolist() == [C] and index.tolist() == [2]


def test_lprm_and_halt_take_the_first_of_equal_maxima():
    answers = candidates([A, B, C, A], [A, B, C, B])
    value = torch.tensor([[0.2, 0.9], [0.7, 0.9], [0.7, 0.1], [0.1, 0.3]])
    halt = torch.tensor([[3.0, -1.0], [-2.0, -1.0], [3.0, -0.5], [0.0, -0.5]])
    selected, index = lprm_best(answers, value=value)
    assert index.tolist() == [1, 0] and selected.tolist() == [B, A]
    selected, index = halt_best(answers, halt_logit=halt)
    assert index.tolist() == [0, 2] and selected.tolist() == [A, C]


def test_first_and_the_registry():
    answers = candidates([C, A], [B, A])
    selected, index = first(answers)
    assert selected.tolist() == [C, B] and index.tolist() == [0, 0]
    assert set(SELECTORS) == {"vote", "lprm", "halt", "first", "smc"}
    assert SELECTORS["smc"] is majority_vote  # the vote among test-time SMC's survivors
    value = torch.tensor([[0.1, 0.1], [0.5, 0.0]])
    assert select("lprm", answers, value, None)[1].tolist() == [1, 0]


def test_bad_selector_name_and_missing_scores_are_errors():
    with pytest.raises(UserError, match="unknown selector 'best'; allowed: vote, lprm, halt, first, smc"):
        select("best", candidates([A]))
    with pytest.raises(ValueError, match="LPRM value"):
        lprm_best(candidates([A]))


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_vote_matches_a_counting_reference(data):
    n, b = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 3))
    rows = data.draw(st.lists(st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=2),
                                       min_size=b, max_size=b), min_size=n, max_size=n))
    answers = torch.tensor(rows)
    selected, index = majority_vote(answers)
    one_by_one = majority_vote(answers, memory_budget_mb=1e-9)  # one input per block
    assert torch.equal(one_by_one[0], selected) and torch.equal(one_by_one[1], index)
    for column in range(b):
        proposals = [tuple(answers[i, column].tolist()) for i in range(n)]
        best = max(proposals, key=lambda p: (proposals.count(p), -proposals.index(p)))
        assert tuple(selected[column].tolist()) == best
        assert index[column] == proposals.index(best)


def test_a_vote_over_many_candidates_needs_no_pairwise_array():
    """200,000 candidates of 2 inputs: the pairwise count would be 80 GB; counting pairs is linear."""
    answers = torch.ones(200_000, 2, 3, dtype=torch.long)
    answers[:99_999, 1, 0] = 2  # input 1: 99,999 votes for [2, 1, 1], 100,001 for [1, 1, 1]
    selected, index = majority_vote(answers, memory_budget_mb=1)
    assert selected.tolist() == [[1, 1, 1], [1, 1, 1]] and index.tolist() == [0, 99_999]


def test_the_vote_counts_as_many_inputs_at_once_as_its_budget_holds():
    answers = torch.zeros(10, 6, 4, dtype=torch.long)
    per_input = 10 * (4 * VOTE_BYTES[0] + VOTE_BYTES[1])
    assert vote_inputs_per_block(answers, 3 * per_input / 2**20) == 3
    assert vote_inputs_per_block(answers, 1e-9) == 1 and vote_inputs_per_block(answers, None) == 6
    assert torch.equal(select("vote", answers, memory_budget_mb=1e-9)[1], majority_vote(answers)[1])
