"""Tests for the graph colouring task."""

import inspect
import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gram_pyro.config import UserError
from gram_pyro.tasks import coloring
from gram_pyro.tasks.base import IGNORE
from gram_pyro.tasks.coloring import (
    ColoringTask,
    canonical_colourings,
    canonicalize,
    colouring_codes,
    count_conflicts,
    encode_graphs,
    enumerate_colourings,
    format_answer,
    graph_edges,
    is_proper_colouring,
    node_pairs,
    read_graphs,
    sequence_length,
)

N = 6
SMALL = dict(n=N, num_train=40, num_test=10)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return ColoringTask(**SMALL, cache_dir=str(tmp_path_factory.mktemp("cache")))


def edges_of(n, pairs):
    """Bool ``[E]`` for an edge list."""
    first, second = node_pairs(n)
    wanted = {tuple(sorted(p)) for p in pairs}
    return torch.tensor([(i, j) in wanted for i, j in zip(first.tolist(), second.tolist())])


def answer_for(x, colours):
    """An answer sequence: garbage on the triangle, colour tokens ``3 + c`` (or raw tokens) on the nodes."""
    n = len(colours)
    return torch.cat([torch.full((x.shape[-1] - n,), 5), torch.tensor(colours)])


def stored_colourings(split, m):
    """The canonical colourings ``[K, n]`` stored for input ``m`` of a split."""
    start = split.solution_starts[m]
    return canonical_colourings(N)[split.solution_ids[start:start + split.num_solutions[m]]]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def all_splits_equal(a, b):
    return all(torch.equal(getattr(a.splits[s], f), getattr(b.splits[s], f))
               for s in ("train", "test") for f in ("inputs", "num_solutions", "solution_ids"))


@settings(max_examples=50, deadline=None)
@given(st.integers(4, 12).flatmap(lambda n: st.lists(st.booleans(), min_size=n * (n - 1) // 2,
                                                     max_size=n * (n - 1) // 2)))
def test_encoding_round_trips(edge_list):
    edges = torch.tensor(edge_list)
    x = encode_graphs(edges)
    n = round((1 + math.sqrt(1 + 8 * len(edge_list))) / 2)
    assert x.shape == (sequence_length(n),)
    assert set(x[:len(edges)].tolist()) <= {1, 2} and (x[len(edges):] == 0).all()
    assert torch.equal(graph_edges(x), edges)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(4, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1]),
                         max_size=20))))
def test_user_file_round_trips_through_read_graphs_and_format_answer(tmp_path, graph):
    n, pairs = graph
    path = write_lines(tmp_path / "graphs.jsonl", [json.dumps({"n": n, "edges": [list(p) for p in pairs]})])
    x = read_graphs(path, n)
    assert torch.equal(x[0], encode_graphs(edges_of(n, pairs)))
    line = json.loads(format_answer(x[0], x[0]))
    assert line["n"] == n and line["edges"] == sorted(map(list, {tuple(sorted(p)) for p in pairs}))
    assert line["colours"] == [None] * n and line["valid"] is False
    write_lines(path, [format_answer(x[0], x[0])])
    assert torch.equal(read_graphs(path, n), x)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=12), st.permutations([0, 1, 2]))
def test_canonical_form_is_invariant_under_colour_permutation(colours, permutation):
    colours = torch.tensor(colours)
    permuted = torch.tensor(permutation)[colours]
    canonical = canonicalize(colours)
    assert torch.equal(canonicalize(permuted), canonical)
    assert torch.equal(canonicalize(canonical), canonical)
    assert canonical[0] == 0
    same = colours[:, None] == colours[None, :]
    assert torch.equal(canonical[:, None] == canonical[None, :], same)
    assert colouring_codes(permuted) == colouring_codes(colours)


@pytest.mark.parametrize("n,count", [(1, 1), (3, 5), (4, 14), (8, 1094), (10, 9842)])
def test_canonical_colouring_counts_are_set_partitions_into_at_most_three_blocks(n, count):
    table = canonical_colourings(n)
    assert table.shape == (count, n)
    assert torch.equal(canonicalize(table), table)
    assert len(set(colouring_codes(table).tolist())) == count


@pytest.mark.parametrize("name,n,pairs,count", [
    ("triangle K3", 3, [(0, 1), (1, 2), (0, 2)], 1),
    ("path of 3", 3, [(0, 1), (1, 2)], 2),
    ("empty on 3", 3, [], 5),
    ("cycle C5", 5, [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)], 5),
    ("K4", 4, list(itertools.combinations(range(4), 2)), 0),
])
def test_enumerated_colourings_of_hand_graphs_match_known_counts(name, n, pairs, count):
    num, ids = enumerate_colourings(edges_of(n, pairs)[None], canonical_colourings(n))
    assert num.tolist() == [count], name
    assert len(ids) == count


@settings(max_examples=50, deadline=None)
@given(st.integers(3, 6).flatmap(lambda n: st.lists(st.booleans(), min_size=n * (n - 1) // 2,
                                                     max_size=n * (n - 1) // 2)))
def test_enumeration_agrees_with_brute_force_chromatic_count(edge_list):
    edges = torch.tensor(edge_list)
    n = round((1 + math.sqrt(1 + 8 * len(edge_list))) / 2)
    pairs = [p for p, e in zip(zip(*map(torch.Tensor.tolist, node_pairs(n))), edge_list) if e]
    proper = sum(all(c[i] != c[j] for i, j in pairs) for c in itertools.product(range(3), repeat=n))
    table = canonical_colourings(n)
    _, ids = enumerate_colourings(edges[None], table)
    used = torch.tensor([len(set(row)) for row in table[ids].tolist()], dtype=torch.long)
    assert sum(math.perm(3, int(k)) for k in used) == proper  # each canonical one stands for 3!/(3-k)!
    answers = encode_graphs(edges).expand(len(ids), -1).clone()
    answers[:, -n:] = 3 + table[ids]
    assert is_proper_colouring(encode_graphs(edges), answers).all()


def test_judge_rejects_conflicts_and_non_colour_tokens_and_accepts_proper_colourings(task):
    x = encode_graphs(edges_of(4, [(0, 1), (1, 2), (2, 3), (0, 3)]))  # the cycle C4
    cases = {  # node tokens -> (proper, conflicting edges)
        (3, 4, 3, 4): (True, 0),
        (3, 4, 5, 4): (True, 0),
        (5, 3, 5, 4): (True, 0),
        (3, 3, 4, 5): (False, 1),
        (3, 3, 3, 3): (False, 4),
        (3, 4, 3, 0): (False, 2),  # pad at node 3: both of its edges count
        (3, 4, 3, 6): (False, 2),  # out of the vocabulary
        (3, 4, 1, 4): (False, 2),  # an adjacency token
    }
    answers = torch.stack([answer_for(x, list(tokens)) for tokens in cases])
    assert is_proper_colouring(x, answers).tolist() == [ok for ok, _ in cases.values()]
    assert count_conflicts(x, answers).tolist() == [c for _, c in cases.values()]
    assert torch.equal(task.judge(x, answers), is_proper_colouring(x, answers))
    isolated = encode_graphs(edges_of(4, [(0, 1)]))
    lone_pad = answer_for(isolated, [3, 4, 3, 0])
    assert not is_proper_colouring(isolated, lone_pad) and count_conflicts(isolated, lone_pad) == 0
    assert is_proper_colouring(x, torch.stack([answers[:3], answers[:3]])).shape == (2, 3)


@pytest.mark.parametrize("name", ["train", "test"])
def test_stored_colourings_are_exactly_the_proper_canonical_ones(task, name):
    split = task.splits[name]
    table = canonical_colourings(N)
    answers = split.inputs[:1].repeat(len(table), 1)
    answers[:, -N:] = 3 + table
    proper = is_proper_colouring(split.inputs[:, None], answers[None])  # [M, C]
    stored = torch.zeros_like(proper)
    rows = torch.arange(len(split)).repeat_interleave(split.num_solutions)
    stored[rows, split.solution_ids] = True
    assert torch.equal(stored, proper)
    assert (split.num_solutions > 0).all()


def test_splits_are_disjoint_distinct_sized_and_seeded(task, tmp_path):
    train, test = task.splits["train"], task.splits["test"]
    assert (len(train), len(test)) == (40, 10)
    rows = [tuple(r) for split in (train, test) for r in split.inputs.tolist()]
    assert len(set(rows)) == 50
    again = ColoringTask(**SMALL, cache_dir=str(tmp_path))
    assert all_splits_equal(again, task)
    other = ColoringTask(**SMALL, seed=1, cache_dir=str(tmp_path))
    assert not torch.equal(other.splits["test"].inputs, test.inputs)


def test_batch_targets_are_proper_random_reproducible_and_canonical_without_permutation(task, tmp_path):
    split = task.splits["train"]
    index = torch.arange(len(split)).repeat(5)
    batch = split.batch(index, torch.Generator().manual_seed(0))
    assert torch.equal(batch.x, split.inputs[index]) and batch.puzzle is None
    assert (batch.y[:, :-N] == IGNORE).all()
    assert task.judge(batch.x, batch.y).all()
    assert torch.equal(split.batch(index, torch.Generator().manual_seed(0)).y, batch.y)
    colours = batch.y[:, -N:] - 3
    assert not torch.equal(canonicalize(colours), colours)  # colour ids were permuted
    m = int(split.num_solutions.argmax())
    fixed = ColoringTask(**SMALL, permute_colours=False, cache_dir=str(tmp_path)).splits["train"]
    colours = fixed.batch(torch.full((3000,), m), torch.Generator().manual_seed(1)).y[:, -N:] - 3
    assert torch.equal(canonicalize(colours), colours)
    assert {tuple(r) for r in colours.tolist()} == {tuple(r) for r in stored_colourings(fixed, m).tolist()}


def test_coverage_counts_distinct_canonical_colourings(task):
    split = task.splits["test"]
    m = int(split.num_solutions.argmax())
    count = int(split.num_solutions[m])
    assert count >= 3
    x = split.inputs[m]
    sol = [answer_for(x, (3 + c).tolist()) for c in stored_colourings(split, m)[:3]]
    permuted = sol[0].clone()
    permuted[-N:] = torch.tensor([5, 3, 4])[sol[0][-N:] - 3]
    invalid = sol[0].clone()
    invalid[-N:] = 3
    index = torch.tensor([m])
    distinct = task.per_input("test", index, torch.stack(sol)[:, None])
    assert distinct["coverage"].tolist() == [pytest.approx(3 / count)]
    assert distinct["accuracy"].tolist() == [1.0] and distinct["conflicts"].tolist() == [0.0]
    repeated = task.per_input("test", index, torch.stack([sol[0], permuted, sol[1], invalid])[:, None])
    assert repeated["coverage"].tolist() == [pytest.approx(2 / count)]
    assert repeated["accuracy"].tolist() == [0.75]
    edges = int(graph_edges(x).sum())
    assert repeated["conflicts"].tolist() == [pytest.approx(edges / 4)]


def test_score_averages_per_input_and_totals_conflicts(task):
    split = task.splits["test"]
    index = torch.arange(len(split))
    answers = split.inputs[index].clone().expand(3, -1, -1).clone()
    answers[..., -N:] = 3  # one colour everywhere: every edge conflicts
    scores = task.score("test", index, answers)
    edges = graph_edges(split.inputs).sum(-1).float()
    assert scores["accuracy"] == 0.0 and scores["coverage"] == 0.0
    assert scores["conflicts"] == pytest.approx(edges.mean().item())
    assert scores["conflicts_total"] == pytest.approx(edges.sum().item())


def test_stats_report_counts_histograms_and_graph_sizes(task):
    stats = json.loads(json.dumps(task.stats()))
    assert {k: stats[k] for k in ("task", "n", "vocab_size", "seq_len", "edge_prob")} == \
        {"task": "coloring", "n": N, "vocab_size": 6, "seq_len": 21, "edge_prob": 0.35}
    for name, split in task.splits.items():
        entry = stats["splits"][name]
        assert entry["inputs"] == len(split)
        assert sum(entry["solutions_per_input"].values()) == len(split)
        assert entry["mean_edges"] == pytest.approx(graph_edges(split.inputs).sum(-1).float().mean().item())
    assert 0 < stats["mean_edges"] < 15


def test_cache_is_reused_and_a_corrupt_file_is_rebuilt(tmp_path, monkeypatch, capsys):
    first = ColoringTask(**SMALL, cache_dir=str(tmp_path))
    [npz] = tmp_path.glob("coloring-*.npz")
    calls = []
    sample = coloring.sample_colourable_graphs
    monkeypatch.setattr(coloring, "sample_colourable_graphs", lambda *a: calls.append(a) or sample(*a))
    assert all_splits_equal(ColoringTask(**SMALL, cache_dir=str(tmp_path)), first)
    assert calls == []
    npz.write_bytes(b"not an archive")
    rebuilt = ColoringTask(**SMALL, cache_dir=str(tmp_path))
    assert len(calls) == 1 and "damaged" in capsys.readouterr().err
    assert all_splits_equal(rebuilt, first)


@pytest.mark.parametrize("line,reason", [
    ('{"n": 6, "edges": [[0, 1]', "invalid JSON"),
    ('[0, 1]', 'keys "n" and "edges"'),
    ('{"n": 7, "edges": []}', "n=7"),
    ('{"n": 6, "edges": [[0, 6]]}', "outside 0..5"),
    ('{"n": 6, "edges": [[-1, 2]]}', "outside 0..5"),
    ('{"n": 6, "edges": [[2, 2]]}', "self loop"),
    ('{"n": 6, "edges": [[0, 1, 2]]}', "node pairs"),
    ('{"n": 6, "edges": [[0, true]]}', "node pairs"),
])
def test_malformed_user_line_names_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path / "graphs.jsonl", ["# two good graphs, then a bad one", '{"n": 6, "edges": []}',
                                                   '{"n": 6, "edges": [[0, 1]]}', line])
    with pytest.raises(UserError, match=rf"^{path}:4: .*{reason}"):
        read_graphs(path, N)


def test_task_trains_on_distinct_graphs_of_a_source_file(tmp_path):
    across = [(i, j) for i, j in itertools.combinations(range(N), 2) if i % 3 != j % 3]  # 3-colourable
    lines = [json.dumps({"n": N, "edges": [p for b, p in enumerate(across) if k >> b & 1]}) for k in range(20)]
    path = write_lines(tmp_path / "graphs.jsonl", lines + lines[:5])
    task = ColoringTask(n=N, source=str(path), test_fraction=0.25, cache_dir=str(tmp_path))
    assert (len(task.splits["train"]), len(task.splits["test"])) == (15, 5)
    inputs = torch.cat([task.splits["train"].inputs, task.splits["test"].inputs])
    assert {tuple(r) for r in inputs.tolist()} == {tuple(r) for r in read_graphs(path, N).tolist()}
    assert task.stats()["edge_prob"] is None and task.stats()["source"] == str(path)
    k4 = json.dumps({"n": N, "edges": [list(p) for p in itertools.combinations(range(4), 2)]})
    write_lines(path, lines[:3] + [k4] + lines[3:])
    with pytest.raises(UserError, match=rf"^{path}:4: graph is not 3-colourable"):
        ColoringTask(n=N, source=str(path), cache_dir=str(tmp_path))


def test_format_answer_reports_colours_and_validity():
    x = encode_graphs(edges_of(4, [(0, 1), (2, 3)]))
    line = json.loads(format_answer(x, answer_for(x, [3, 4, 5, 5])))
    assert line == {"n": 4, "edges": [[0, 1], [2, 3]], "colours": [0, 1, 2, 2], "valid": False}
    assert json.loads(format_answer(x, answer_for(x, [3, 4, 0, 5])))["colours"] == [0, 1, None, 2]
    assert json.loads(format_answer(x, answer_for(x, [3, 4, 4, 5])))["valid"] is True


@pytest.mark.parametrize("kwargs,key", [({"n": 3}, "n"), ({"n": 13}, "n"), ({"edge_prob": 0.0}, "edge_prob"),
                                        ({"num_train": 0}, "num_train"), ({"num_test": 1.5}, "num_test"),
                                        ({"test_fraction": 1.0}, "test_fraction")])
def test_bad_config_is_a_user_error_naming_the_key(kwargs, key):
    with pytest.raises(UserError, match=rf"^coloring: {key} must be"):
        ColoringTask(**kwargs)


def test_too_few_graphs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="only .* distinct 3-colourable graphs found for n=4"):
        ColoringTask(n=4, num_train=100, num_test=10, cache_dir=str(tmp_path))


@pytest.mark.parametrize("config,n", [("coloring", 8), ("coloring10", 10)])
def test_configs_name_the_task_and_its_arguments(config, n):
    node = OmegaConf.load(f"experiments/configs/task/{config}.yaml")
    assert node._target_ == "gram_pyro.tasks.coloring.ColoringTask" and node.n == n
    arguments = {k: v for k, v in OmegaConf.to_container(node).items() if k != "_target_"}
    inspect.signature(ColoringTask).bind(**arguments)
