"""The helpers every task shares (gram_pyro.tasks.base): argument checks, the random target slot,
coverage@N from solution ids and batch rows."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram_pyro.config import UserError
from gram_pyro.tasks.base import Batch, a_fraction, an_integer, check_arguments, coverage_at_n, random_slot


def test_coverage_counts_distinct_valid_solution_ids():
    ids = torch.tensor([[3, -1, 0], [3, -1, 1], [5, -1, 2], [-1, -1, 1]])
    coverage = coverage_at_n(ids, torch.tensor([4, 2, 3]))
    assert coverage.tolist() == [0.5, 0.0, 1.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 4), min_size=3, max_size=3), min_size=1, max_size=8))
def test_coverage_matches_a_set_reference(rows):
    ids = torch.tensor(rows)
    num_solutions = torch.tensor([5, 6, 7])
    expected = [len({r[c] for r in rows} - {-1}) / num_solutions[c].item() for c in range(3)]
    assert coverage_at_n(ids, num_solutions).tolist() == pytest.approx(expected)


def test_coverage_divides_in_the_dtype_of_the_solution_counts():
    ids = torch.tensor([[0], [1]])
    assert coverage_at_n(ids, torch.tensor([3])).dtype == torch.get_default_dtype()
    assert coverage_at_n(ids, torch.tensor([3.0], dtype=torch.float64)).item() == 2 / 3


def test_random_slot_is_one_uniform_draw_below_each_count():
    counts = torch.tensor([1, 2, 5, 3])
    generator = torch.Generator().manual_seed(7)
    slot = random_slot(counts, generator)
    u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(slot, (u * counts).long())
    after = torch.Generator().manual_seed(7)
    torch.rand(4, generator=after)
    assert torch.equal(generator.get_state(), after.get_state())  # exactly one draw of B numbers
    many = random_slot(torch.full((20_000,), 3), torch.Generator().manual_seed(0))
    assert torch.bincount(many).tolist() == pytest.approx([20_000 / 3] * 3, rel=0.05)


def test_a_bad_argument_names_its_key_and_what_is_allowed():
    check_arguments("demo", {"n": (4, True, "an integer")})
    with pytest.raises(UserError, match=r"^demo: k must be an integer >= 1, got 0$"):
        check_arguments("demo", {"n": (4, True, "an integer"), "k": (0, False, "an integer >= 1"),
                                 "m": ("x", False, "never reached")})


@pytest.mark.parametrize("check,ok,allowed", [
    (an_integer(4, 4, 12), True, "an integer in 4..12"), (an_integer(13, 4, 12), False, "an integer in 4..12"),
    (an_integer(6.0, 4, 12), False, "an integer in 4..12"), (an_integer("abc", 1), False, "an integer >= 1"),
    (an_integer(True, 0), False, "an integer >= 0"), (an_integer(10**9, 1), True, "an integer >= 1"),
    (a_fraction(0.5), True, "a number in (0, 1)"), (a_fraction(1), False, "a number in (0, 1)"),
    (a_fraction(1, one=True), True, "a number in (0, 1]"), (a_fraction(0.0, one=True), False, "a number in (0, 1]"),
    (a_fraction("half"), False, "a number in (0, 1)"),
])
def test_the_common_checks_say_what_is_allowed(check, ok, allowed):
    assert (bool(check[1]), check[2]) == (ok, allowed)


def test_batch_rows_slices_every_field():
    batch = Batch(torch.arange(12).view(4, 3), -torch.arange(12).view(4, 3), torch.arange(4))
    part = batch.rows(slice(1, None, 2))
    assert part.x.tolist() == [[3, 4, 5], [9, 10, 11]] and part.y.tolist() == [[-3, -4, -5], [-9, -10, -11]]
    assert part.puzzle.tolist() == [1, 3]
    assert Batch(batch.x, batch.y).rows(torch.tensor([0])).puzzle is None
