"""The levers against the posterior shortcut (KL cap, prior rollouts, posterior steps, target dropout)
against hand computations, and the training-time shortcut check."""

import csv
import itertools
import re
from types import SimpleNamespace

import pytest
import torch

from gram_pyro.config import UserError, compose_config, group_options
from gram_pyro.diagnostics.shortcut import shortcut_check
from gram_pyro.experiments import shortcut_levers
from gram_pyro.inference import guided_trajectory
from gram_pyro.objectives import TruncatedSurrogate
from gram_pyro.objectives.base import matched_targets
from gram_pyro.reference import gaussian_kl, supervision_step, surrogate_loss, token_log_likelihood
from gram_pyro.tasks.base import IGNORE, Batch, distinct_argmax, most_likely
from gram_pyro.tasks.coloring import FIRST_COLOUR, ColoringTask, canonicalize
from gram_pyro.tasks.digits import DigitsTask
from gram_pyro.tasks.nqueens import NQueensTask
from gram_pyro.tasks.sudoku import SudokuTask, UnconditionalSudokuTask
from gram_pyro.training import shortcut_verdict, train
from gram_pyro.guides import PriorGuide
from tests.conftest import tiny_guide, tiny_model
from tests.helpers import TINY, tiny_config


def start(model, batch_size):
    return model.h0.expand(batch_size, -1, -1), model.l0.expand(batch_size, -1, -1)


def prior_step(model, x, h, l):
    """One supervision step with every eps drawn from the prior, truncated: the decoder's logits, the
    detached state ``h, l`` and the final transition's proposal ``u`` and prior ``loc, scale``."""
    e_x = model.encoder(x)
    for t in range(model.transitions):
        with torch.no_grad() if t < model.transitions - 1 else torch.enable_grad():
            l = model.core.refine_low(l, h, e_x)
            u = model.core.propose_high(h, l)
            loc, scale = model.noise_heads["eps"](u)
            h = u + torch.distributions.Normal(loc, scale).rsample()
    return SimpleNamespace(logits=model.decoder(h), h=h.detach(), l=l.detach(), u=u, loc=loc, scale=scale)


def chains_by_hand(model, guide, x, y):
    """The steps of the prior rollouts' chain and of the guided chain, by hand and in the objective's
    order (at each supervision step the prior chain draws first): yields ``(prior_step, guided_step)``."""
    (h, l), (hp, lp) = start(model, x.shape[0]), start(model, x.shape[0])
    for _ in range(model.n_sup):
        prior = prior_step(model, x, hp, lp)
        hp, lp = prior.h, prior.l
        step = supervision_step(model, guide, x, y, h, l, truncate=True, posterior_everywhere=False)
        h, l = step.h.detach(), step.l.detach()
        yield prior, step


def losses_and_chains_by_hand(objective, data, seed):
    """A tiny model and guide; the objective's ``(loss, metrics)`` at every supervision step of one batch
    drawn from ``seed``, each beside the ``(prior_step, guided_step)`` of :func:`chains_by_hand` drawn
    from the same seed."""
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    torch.manual_seed(seed)
    state = {}
    ours = [objective.loss(model, guide, Batch(x, y), state, n) for n in range(model.n_sup)]
    torch.manual_seed(seed)
    return model, guide, list(zip(ours, chains_by_hand(model, guide, x, y)))


@pytest.mark.parametrize("cap_share", [0.5, 2.0])
def test_kl_cap_adds_its_weight_times_the_excess_over_the_cap(data, cap_share):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    torch.manual_seed(7)
    step = supervision_step(model, guide, x, y, *start(model, x.shape[0]), truncate=True, posterior_everywhere=False)
    kl = step.kl_last.sum() / y.numel()
    cap = cap_share * kl.item()
    uncapped = surrogate_loss(model, step, x, y, beta=0.3)
    expected = uncapped + 4.0 * (kl - cap).clamp(min=0)
    torch.manual_seed(7)
    loss, _ = TruncatedSurrogate(beta=0.3, kl_cap=cap, kl_cap_weight=4.0).loss(model, guide, Batch(x, y), {}, 0)
    assert torch.allclose(loss, expected, atol=1e-5, rtol=1e-6), (loss, expected)
    assert (loss.item() > uncapped.item() + 1.0) == (cap_share < 1)


def test_a_beta_schedule_prices_the_kl_by_hand_batch_by_batch_and_resumes(data):
    """beta moves linearly from beta_start at batch 1 to beta at batch beta_batches + 1: each batch's
    first-step loss is the hand-computed surrogate at that batch's beta, logged as ``beta``."""
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    objective = TruncatedSurrogate(beta=2.0, beta_start=0.5, beta_batches=3)
    for batch, beta in enumerate([0.5, 1.0, 1.5, 2.0, 2.0], start=1):
        torch.manual_seed(batch)
        loss, metrics = objective.loss(model, guide, Batch(x, y), {}, 0)
        torch.manual_seed(batch)
        step = supervision_step(model, guide, x, y, *start(model, x.shape[0]), truncate=True,
                                posterior_everywhere=False)
        expected = surrogate_loss(model, step, x, y, beta=beta)
        assert objective.batches == batch and metrics["beta"].item() == pytest.approx(beta)
        assert torch.allclose(loss, expected, atol=1e-5, rtol=1e-6), (batch, loss, expected)
    resumed = TruncatedSurrogate(beta=2.0, beta_start=0.5, beta_batches=3)
    resumed.load_state_dict({"batches": 1})
    assert resumed.current_beta() == pytest.approx(0.5)  # the next batch is the second: 1.0 once it starts
    _, metrics = resumed.loss(model, guide, Batch(x, y), {}, 0)
    assert metrics["beta"].item() == pytest.approx(1.0)
    assert "beta" not in TruncatedSurrogate(beta=2.0).loss(model, guide, Batch(x, y), {}, 0)[1]


@pytest.mark.parametrize("options, message", [
    ({"beta_start": -1.0, "beta_batches": 5}, "beta_start must be a finite number >= 0 or null, got -1.0"),
    ({"beta_start": 0.1}, "beta_batches must be a whole number >= 0, and >= 1 with a beta_start, got 0"),
    ({"beta_batches": 2.5}, "beta_batches must be a whole number >= 0, and >= 1 with a beta_start, got 2.5")])
def test_a_bad_beta_schedule_is_a_one_line_error(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TruncatedSurrogate(**options)


def test_prior_rollouts_score_a_prior_chain_against_the_target(data):
    x, y = data
    weight, beta, tokens = 0.25, 0.3, y.numel()
    model, _, steps = losses_and_chains_by_hand(TruncatedSurrogate(beta=beta, prior_weight=weight), data, 5)
    for (loss, metrics), (prior, step) in steps:
        prior_nll = -token_log_likelihood(prior.logits, y).sum() / tokens
        guided = (-token_log_likelihood(step.logits, y).sum() + beta * step.kl_last.sum()) / tokens
        heads = surrogate_loss(model, step, x, y, beta) - guided
        expected = (1 - weight) * guided + weight * prior_nll + heads
        assert torch.allclose(metrics["prior_nll"], prior_nll, atol=1e-5, rtol=0)
        assert torch.allclose(loss, expected, atol=1e-5, rtol=0), (loss, expected)


def test_latent_overshooting_pays_the_kl_from_the_guided_state_to_the_prior_chain_state(data):
    x, y = data
    weight, tokens = 0.5, y.numel()
    model, guide, steps = losses_and_chains_by_hand(TruncatedSurrogate(overshoot_weight=weight), data, 3)
    for (loss, metrics), (prior, step) in steps:
        overshoot = gaussian_kl(step.u + step.loc_q, step.scale_q, prior.u + prior.loc, prior.scale).sum() / tokens
        expected = surrogate_loss(model, step, x, y, beta=1.0) + weight * overshoot
        assert "prior_nll" not in metrics
        assert torch.allclose(metrics["overshoot"], overshoot, atol=1e-5, rtol=1e-6)
        assert torch.allclose(loss, expected, atol=1e-5, rtol=1e-6), (loss, expected)
    _, metrics = TruncatedSurrogate(overshoot_weight=weight).loss(model, guide, Batch(x, y), {}, 0)
    to_guide = torch.autograd.grad(metrics["overshoot"], list(guide.parameters()), allow_unused=True)
    to_prior = torch.autograd.grad(metrics["overshoot"], list(model.noise_heads.parameters()))
    assert all(g is None or not g.any() for g in to_guide)  # the guided chain is the fixed target
    assert sum(g.abs().sum() for g in to_prior) > 0
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="overshoot_weight"):
            TruncatedSurrogate(overshoot_weight=bad)


def test_posterior_steps_leave_later_steps_to_the_prior(data):
    x, y = data
    model = tiny_model(n_sup=3)
    guide = tiny_guide(model, posterior_steps=1)
    assert guide.covers("eps/0/1") and not guide.covers("eps/0/0") and not guide.covers("eps/1/1")
    objective, state = TruncatedSurrogate(), {}
    kls = [objective.loss(model, guide, Batch(x, y), state, n)[1]["kl"].item() for n in range(model.n_sup)]
    assert kls[0] > 0.01 and kls[1:] == [0.0, 0.0]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="posterior_steps"):
            tiny_guide(model, posterior_steps=bad)


def test_target_dropout_hides_target_tokens_in_training_only(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model, target_dropout=0.5)
    u = torch.randn(x.shape[0], model.num_prefix + x.shape[1], model.dim)
    prior = model.prior("eps", u)
    torch.manual_seed(11)
    hidden = torch.rand(y.shape) < 0.5
    torch.manual_seed(11)
    dropped = guide.posterior("eps", u, y, prior).base_dist.loc
    expected, _ = guide.heads["eps"](u + guide.target_encoder(y.masked_fill(hidden, 0)))
    assert 0 < hidden.sum() < hidden.numel() and torch.allclose(dropped, expected)
    guide.eval()
    full, _ = guide.heads["eps"](u + guide.target_encoder(y))
    assert torch.allclose(guide.posterior("eps", u, y, prior).base_dist.loc, full)
    with pytest.raises(ValueError, match="target_dropout"):
        tiny_guide(model, target_dropout=1.0)


def test_guided_trajectory_kl_is_log_q_minus_log_p_of_each_transition(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    torch.manual_seed(2)
    answers, kl = guided_trajectory(model, guide, x, y)
    assert kl.shape == (x.shape[0], model.n_sup, model.transitions)
    torch.manual_seed(2)
    h, l = start(model, x.shape[0])
    for n in range(model.n_sup):
        step = supervision_step(model, guide, x, y, h, l, truncate=False, posterior_everywhere=False)
        h, l = step.h, step.l
        # the posterior covers the final transition of each step (posterior_transitions=last): the others pay none
        assert torch.allclose(kl[:, n, -1], step.log_q - step.log_p, atol=1e-4, rtol=1e-6)
        assert torch.equal(kl[:, n, :-1], torch.zeros_like(kl[:, n, :-1])) and (kl[:, n, -1] != 0).all()
    assert torch.equal(answers, step.logits.argmax(-1))
    _, none = guided_trajectory(model, PriorGuide(model), x, y)
    assert torch.equal(none, torch.zeros(x.shape[0], model.n_sup, model.transitions))


def test_shortcut_verdict_needs_a_gap_above_the_threshold():
    trainer = tiny_config().trainer
    assert shortcut_verdict({"accuracy": 0.1, "posterior_accuracy": 0.25, "kl_per_token": 1.0}, trainer) is None
    verdict = shortcut_verdict({"accuracy": 0.0, "posterior_accuracy": 0.9, "kl_per_token": 2.5}, trainer)
    assert verdict.startswith("posterior shortcut: posterior accuracy 90.0%, prior accuracy 0.0%")
    scores = {"accuracy": 1.0, "posterior_accuracy": 1.0, "recognisable": 0.6, "posterior_recognisable": 0.9,
              "kl_per_token": 1.7}  # digits: every image is well formed, the classifier reads fewer
    assert shortcut_verdict(scores, trainer) is None
    assert shortcut_verdict(scores, trainer, "recognisable").startswith(
        "posterior shortcut: posterior recognisable 90.0%, prior recognisable 60.0% (gap 30.0%")


def test_shortcut_check_compares_the_metric_it_is_given():
    check = shortcut_check(torch.tensor([0.5, 0.7]), torch.tensor([0.9, 0.9]), 0.2, "recognisable")
    assert (check.prior_accuracy, check.metric, check.flagged) == (pytest.approx(0.6), "recognisable", True)
    assert check.verdict.startswith("POSTERIOR SHORTCUT: answers decoded along posterior trajectories are "
                                    "recognisable 90.0% of the time but only 60.0% along prior ones")
    healthy = shortcut_check(torch.tensor([1.0]), torch.tensor([1.0]))
    assert healthy.verdict == "no posterior shortcut: posterior accuracy 100.0%, prior accuracy 100.0% " \
                              "(gap +0.0%, threshold 20%)"


FIVE_QUEENS = ["task.n=5", "task.removals=[2,3]", "model.dim=16", "model.ffn_hidden=32", "trainer.batch_size=32",
               "trainer.lr=3e-3", "trainer.max_batches=20", "trainer.eval_every=20", "trainer.eval_inputs=64",
               "trainer.shortcut_action=stop"]


def test_a_run_whose_posterior_carries_the_answer_is_stopped_and_one_without_is_not(tmp_path):
    with pytest.raises(UserError, match="stopped at batch 20 .*posterior shortcut"):
        train(tiny_config(*FIVE_QUEENS, "objective.beta=0", "guide.posterior_transitions=all"),
              tmp_path / "shortcut", quiet=True)
    assert (tmp_path / "shortcut" / "checkpoint.pt").is_file()
    healthy = train(tiny_config(*FIVE_QUEENS, "guide=prior"), tmp_path / "healthy", quiet=True)
    header, row = (healthy / "eval.csv").read_text().splitlines()
    scores = dict(zip(header.split(","), map(float, row.split(","))))
    assert scores["posterior_accuracy"] - scores["accuracy"] <= 0.2 and scores["kl_per_token"] == 0
    cfg = tiny_config(*FIVE_QUEENS).model
    assert [scores[f"kl_per_token/{n}/{t}"] for n in range(cfg.n_sup) for t in range(cfg.transitions)] == [0] * (
        cfg.n_sup * cfg.transitions)


def test_the_shortcut_check_waits_for_shortcut_after_and_warn_only_warns(tmp_path, capsys):
    shortcut = [*FIVE_QUEENS[:-1], "objective.beta=0", "guide.posterior_transitions=all"]
    late = train(tiny_config(*shortcut, "trainer.shortcut_action=stop", "trainer.shortcut_after=21"),
                 tmp_path / "late", quiet=True)  # its only check, at batch 20, comes before the rule acts
    warned = train(tiny_config(*shortcut, "trainer.shortcut_action=warn"), tmp_path / "warned")
    printed = capsys.readouterr()
    assert "warning at batch 20: posterior shortcut: posterior accuracy 100.0%, prior accuracy 0.0%" in printed.out
    for run_dir in (late, warned):  # both trained to the end, and the check's scores are logged
        header, row = (run_dir / "eval.csv").read_text().splitlines()
        scores = dict(zip(header.split(","), map(float, row.split(","))))
        assert scores["batch"] == 20 and scores["posterior_accuracy"] - scores["accuracy"] > 0.2


def test_most_likely_picks_the_allowed_candidate_of_highest_likelihood():
    logits = torch.log(torch.tensor([[[0.7, 0.3], [0.4, 0.6]], [[0.7, 0.3], [0.4, 0.6]]]))  # [B=2, S=2, V=2]
    candidates = torch.tensor([[0, 1], [0, 0], [1, 1]])  # likelihoods 0.42, 0.28, 0.18
    allowed = torch.tensor([[True, True, True], [False, True, True]])
    assert most_likely(logits, candidates, allowed).tolist() == [[0, 1], [0, 0]]


@pytest.mark.parametrize("which", ["nqueens", "uncond_sudoku4"])
def test_nearest_solution_is_the_most_likely_valid_answer(which, tmp_path):
    task = (NQueensTask(n=6, removals=(2, 3), cache_dir=str(tmp_path)) if which == "nqueens"
            else UnconditionalSudokuTask(size=4, cache_dir=str(tmp_path)))
    x = task.splits["test"].inputs[:6]
    logits = torch.randn(*x.shape, task.vocab_size, generator=torch.Generator().manual_seed(0))
    nearest = task.nearest_solution(x, logits)
    assert task.judge(x, nearest).all()
    candidates = task.splits["train"].solutions if which == "nqueens" else task.grids
    log_p = logits.log_softmax(-1)
    for row in range(len(x)):
        valid = candidates[task.judge(x[row].expand(len(candidates), -1), candidates)]
        scores = log_p[row].expand(len(valid), -1, -1).gather(-1, valid.unsqueeze(-1)).squeeze(-1).sum(-1)
        assert torch.equal(nearest[row], valid[scores.argmax()])


def test_nearest_9x9_grid_is_valid_and_keeps_a_grid_the_logits_spell_out(tmp_path, monkeypatch):
    task = UnconditionalSudokuTask(size=9, num_grids=8, num_test=4, cache_dir=str(tmp_path))
    grids = task.grids[:4]
    x = task.splits["test"].inputs[:4]
    noise = torch.randn(4, 81, task.vocab_size, generator=torch.Generator().manual_seed(0))
    assert task.judge(x, task.nearest_solution(x, noise)).all()  # logits that favour no valid grid
    spelled = torch.nn.functional.one_hot(grids, task.vocab_size) * 4.0 + noise  # grid's digit ahead by 4
    assert torch.equal(task.nearest_solution(x, spelled), grids)
    monkeypatch.setattr("gram_pyro.tasks.sudoku_solver.MAX_GUIDED_DEAD_ENDS", -1)  # the fallback search
    assert task.judge(x, task.nearest_solution(x, noise)).all()
    assert torch.equal(task.nearest_solution(x, spelled), grids)  # it keeps the logits' digit preferences
    assert len(torch.unique(task.nearest_solution(x, noise), dim=0)) == 4  # not one fixed grid for every row


def test_distinct_argmax_is_a_greedy_matching_within_each_group():
    scores = torch.tensor([[5.0, 4.0, 0.0],    # group 0, claims first (best score 5): column 0
                           [3.0, 1.0, 2.0],    # group 0, claims third: column 0 taken, then 2
                           [4.5, 4.4, 9.0],    # group 1, alone in its group: its best, column 2
                           [4.0, 3.5, -1.0],   # group 0, claims second: column 0 taken, so column 1
                           [float("-inf"), 1.0, float("-inf")]])  # group 0, last: its one allowed column, taken
    groups = torch.tensor([0, 0, 1, 0, 0])
    assert distinct_argmax(scores, groups).tolist() == [0, 2, 2, 1, 1]


def test_distinct_argmax_with_class_shares_caps_each_class_per_group():
    """Four rows of one group, columns of classes 0, 0, 0, 1, 1 with shares 1/2 each: at most two rows per
    class. Rows 0 and 1 take their best class-0 columns, row 2 (next by confidence) finds class 0 full and
    takes the best class-1 column, row 3 the other one, though it scores the free class-0 column higher."""
    scores = torch.tensor([[9.0, 1.0, 1.0, 0.0, 0.0],
                           [8.0, 7.0, 1.0, 0.0, 0.0],
                           [1.0, 1.0, 6.5, 2.0, 0.0],
                           [1.0, 1.0, 6.0, 0.0, 1.0]])
    groups, classes, shares = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1]), torch.full((2,), 0.5)
    assert distinct_argmax(scores, groups).tolist() == [0, 1, 2, 4]
    assert distinct_argmax(scores, groups, classes, shares).tolist() == [0, 1, 3, 4]


def test_distinct_digits_come_in_the_training_sets_class_shares(tmp_path):
    """Rows with the same logits: ``distinct`` gives each a training image, and no digit more often than
    its share of the training set allows (``ceil(rows * share)``; without the shares 19 of these 60 rows
    show one digit)."""
    task = DigitsTask(cache_dir=str(tmp_path))
    train, rows = task.splits["train"], 60
    logits = 3 * torch.randn(1, task.seq_len, task.vocab_size, generator=torch.Generator().manual_seed(2))
    answers = task.nearest_solution(train.inputs[:rows], logits.expand(rows, -1, -1), distinct=True)
    labels = {tuple(image): label for image, label in zip(train.images.tolist(), train.labels.tolist())}
    counts = torch.bincount(torch.tensor([labels[tuple(answer)] for answer in answers.tolist()]), minlength=10)
    allowed = torch.ceil(rows * torch.bincount(train.labels, minlength=10) / len(train))
    assert (counts <= allowed).all() and counts.sum() == rows and (counts > 0).all()


def test_matched_targets_deal_the_batchs_targets_out_within_each_input_by_likelihood():
    """Rows 0, 1, 3 share an input, row 2 has its own. Targets are one token each (vocab 3; -1 unsupervised
    in a second position). Row 0 is the most confident (token 2 at log 0.9) and takes row 3's target; row 3
    next (token 0 at 0.8, row 0's target); row 1 last gets what is left, its own target (token 1), though
    it would rather have token 2; row 2 keeps its own."""
    x = torch.tensor([[0, 0], [0, 0], [5, 5], [0, 0]])
    y = torch.tensor([[0, IGNORE], [1, IGNORE], [2, IGNORE], [2, IGNORE]])
    p = torch.tensor([[0.05, 0.05, 0.9], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
    logits = torch.stack([p.log(), torch.zeros(4, 3)], 1)
    logits[1, 1, 0] = 50.0  # counted, the unsupervised position would put row 1 first (it would take token 2)
    matched = matched_targets(x, y, logits)
    assert matched.tolist() == [[2, IGNORE], [1, IGNORE], [2, IGNORE], [0, IGNORE]]


def test_prior_rollouts_against_the_batchs_matched_targets_need_no_solution_set(data):
    """``prior_target=matched``: the prior chain's loss is the NLL of the targets that
    :func:`matched_targets` deals out by the chain's own logits; no ``nearest_solution`` is asked for."""
    x, y = data
    x = x[:1].expand_as(x)  # one input: every target may go to every row
    objective = TruncatedSurrogate(prior_weight=0.5, prior_target="matched")
    model, _, steps = losses_and_chains_by_hand(objective, (x, y), 7)
    for (_, metrics), (prior, _) in steps:
        target = matched_targets(x, y, prior.logits)
        assert not torch.equal(target, y) and sorted(target.tolist()) == sorted(y.tolist())
        expected = -token_log_likelihood(prior.logits, target).sum() / y.numel()
        assert torch.allclose(metrics["prior_nll"], expected, atol=1e-5, rtol=0)


def distinct_task(which, tmp_path):
    """A small task of each kind whose ``nearest_solution`` takes ``distinct``."""
    if which == "nqueens":  # inputs of one or two queens: some have two completions
        return NQueensTask(n=5, removals=(3, 4), cache_dir=str(tmp_path))
    if which == "coloring":
        return ColoringTask(n=5, edge_prob=0.5, num_train=20, num_test=8, cache_dir=str(tmp_path))
    if which == "digits":
        return DigitsTask(cache_dir=str(tmp_path))
    return UnconditionalSudokuTask(size=4 if which == "uncond_sudoku4" else 9, num_grids=8, num_test=4,
                                   cache_dir=str(tmp_path))


@pytest.mark.parametrize("which", ["nqueens", "coloring", "digits", "uncond_sudoku4", "uncond_sudoku"])
def test_distinct_nearest_solutions_give_equal_inputs_different_answers(which, tmp_path):
    """Rows of one input with the same logits: ``nearest`` gives each the same answer, ``distinct``
    different valid ones, one of them (the most confident row's) the nearest one itself."""
    task = distinct_task(which, tmp_path)
    test = task.splits["test"]
    rows = 2 if which == "nqueens" else 6
    first = (test.num_completions >= rows).nonzero()[0] if which == "nqueens" else 0  # with enough answers
    x = test.inputs[first].expand(rows, -1)
    logits = torch.randn(1, task.seq_len, task.vocab_size, generator=torch.Generator().manual_seed(0))
    logits = logits.expand(rows, -1, -1)
    nearest = task.nearest_solution(x, logits)
    distinct = task.nearest_solution(x, logits, distinct=True)
    assert len(torch.unique(nearest, dim=0)) == 1
    assert len(torch.unique(distinct, dim=0)) == rows and (distinct == nearest[0]).all(-1).any()
    assert task.judge(x, distinct).all()


@pytest.mark.parametrize("permute_colours", [False, True])
def test_nearest_colouring_is_the_most_likely_proper_one(permute_colours, tmp_path):
    task = ColoringTask(n=5, edge_prob=0.5, num_train=20, num_test=8, permute_colours=permute_colours,
                        cache_dir=str(tmp_path))
    x = task.splits["test"].inputs
    logits = torch.randn(*x.shape, task.vocab_size, generator=torch.Generator().manual_seed(1))
    nearest = task.nearest_solution(x, logits)
    assert (nearest[:, :-5] == IGNORE).all() and task.judge(x, nearest).all()
    every = torch.cartesian_prod(*[torch.arange(3)] * 5)  # all 243 colourings, brute force
    if not permute_colours:
        every = every[(canonicalize(every) == every).all(-1)]
    answers = x[:, None].repeat(1, len(every), 1)
    answers[..., -5:] = FIRST_COLOUR + every
    log_p = logits[:, None, -5:].log_softmax(-1).expand(-1, len(every), -1, -1)
    scores = log_p.gather(-1, answers[..., -5:, None]).squeeze(-1).sum(-1)
    scores[~task.judge(x[:, None], answers)] = float("-inf")
    assert torch.equal(nearest[:, -5:], answers[torch.arange(len(x)), scores.argmax(-1), -5:])


def test_prior_rollouts_against_the_nearest_solution(tmp_path):
    task = NQueensTask(n=6, removals=(2, 3), cache_dir=str(tmp_path))
    batch = task.splits["train"].batch(torch.arange(5), torch.Generator().manual_seed(0))
    model = tiny_model(vocab_size=task.vocab_size, seq_len=task.seq_len)
    guide = tiny_guide(model)
    objective = TruncatedSurrogate(prior_weight=0.5, prior_target="nearest", nearest=task.nearest_solution)
    torch.manual_seed(4)
    _, metrics = objective.loss(model, guide, batch, {}, 0)
    torch.manual_seed(4)
    prior_logits = prior_step(model, batch.x, *start(model, len(batch.x))).logits
    target = task.nearest_solution(batch.x, prior_logits)
    expected = -token_log_likelihood(prior_logits, target).sum() / batch.y.numel()
    assert torch.allclose(metrics["prior_nll"], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="nearest_solution"):
        TruncatedSurrogate(prior_weight=0.5, prior_target="nearest")
    asked = []
    distinct = TruncatedSurrogate(prior_weight=0.5, prior_target="distinct",
                                  nearest=lambda *args, **kwargs: asked.append(kwargs) or task.nearest_solution(*args))
    distinct.loss(model, guide, batch, {}, 0)
    assert asked == [{"distinct": True}]
    with pytest.raises(UserError, match="does not enumerate its solutions"):
        SudokuTask(size=4, num_train=4, num_test=2, extreme_pool=4, num_extreme=1,
                   cache_dir=str(tmp_path)).nearest_solution(batch.x, prior_logits)


def test_several_prior_rollouts_of_each_input_against_distinct_solutions(tmp_path):
    """``prior_rollouts=2`` on a batch of 5: the prior chain runs inputs 0, 0, 1, 1, 2, each pair scored
    against two different completions where the input has two, per supervised token of those rows."""
    task = NQueensTask(n=5, removals=(3, 4), cache_dir=str(tmp_path))
    train = task.splits["train"]
    two = (train.num_completions == 2).nonzero()[:, 0]
    batch = train.batch(torch.cat([two[:2], two[2:5]]), torch.Generator().manual_seed(0))
    model = tiny_model(vocab_size=task.vocab_size, seq_len=task.seq_len)
    guide = tiny_guide(model)
    objective = TruncatedSurrogate(prior_weight=0.5, prior_target="distinct", prior_rollouts=2,
                                   nearest=task.nearest_solution)
    torch.manual_seed(4)
    _, metrics = objective.loss(model, guide, batch, {}, 0)
    rows = torch.tensor([0, 0, 1, 1, 2])
    torch.manual_seed(4)
    prior_logits = prior_step(model, batch.x[rows], *start(model, 5)).logits
    target = task.nearest_solution(batch.x[rows], prior_logits, distinct=True)
    assert not torch.equal(target[0], target[1]) and not torch.equal(target[2], target[3])
    expected = -token_log_likelihood(prior_logits, target).sum() / (batch.y[rows] != IGNORE).sum()
    assert torch.allclose(metrics["prior_nll"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{"prior_target": "nearest"}, {"overshoot_weight": 0.1},
                                    {"heads": "prior"}, {"prior_rollouts": 0}])
def test_several_prior_rollouts_need_distinct_targets_and_no_pairing(kwargs):
    settings = {"prior_weight": 0.5, "prior_target": "distinct", "prior_rollouts": 2, **kwargs}
    with pytest.raises(ValueError, match="prior_rollouts"):
        TruncatedSurrogate(nearest=lambda x, logits, distinct=False: x, **settings)


def test_prior_rollouts_join_after_prior_start_batches_and_the_count_is_checkpointed(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    objective = TruncatedSurrogate(prior_weight=0.5, prior_start=1)
    first = objective.loss(model, guide, Batch(x, y), {}, 0)[1]["prior_nll"]
    second = objective.loss(model, guide, Batch(x, y), {}, 0)[1]["prior_nll"]
    assert first.isnan() and second.isfinite()
    resumed = TruncatedSurrogate(prior_weight=0.5, prior_start=1)
    resumed.load_state_dict(objective.state_dict())
    assert resumed.loss(model, guide, Batch(x, y), {}, 0)[1]["prior_nll"].isfinite()
    with pytest.raises(ValueError, match="prior_start"):
        TruncatedSurrogate(prior_start=-1)


def test_a_task_recipe_applies_to_its_combination_only_and_paper_or_an_override_replaces_it():
    def levers(*overrides):
        cfg = compose_config("train", list(overrides))
        return (cfg.model.init_scale, cfg.guide.get("posterior_steps"), cfg.objective.get("kl_cap"),
                cfg.objective.get("prior_start"))

    assert levers("task=coloring") == (0.1, 1, 0.35, 600)  # experiments/configs/recipe/coloring_gram_...yaml
    assert levers("task=coloring10") == (0.1, 1, 0.35, 300)
    paper = (1.0, None, None, 0)
    assert levers("task=coloring", "recipe=paper") == levers("task=nqueens") == paper  # nqueens has no recipe
    assert levers("task=coloring", "model=trm", "guide=prior") == paper  # the combination has no recipe
    assert levers("task=coloring", "objective=iwae")[:2] == (1.0, None)
    assert levers("task=coloring", "objective.kl_cap=1") == (0.1, 1, 1, 600)  # a key override wins
    with pytest.raises(UserError, match="recipe"):
        compose_config("train", ["task=coloring", "recipe=coloring"])


def test_every_recipe_names_a_combination_that_exists_and_changes_it():
    options = {group: group_options(group) for group in ("task", "model", "guide", "objective")}
    for name in group_options("recipe"):
        if name == "paper":
            continue
        combinations = [choice for choice in itertools.product(*options.values()) if "_".join(choice) == name]
        assert len(combinations) == 1, name
        chosen = [f"{group}={option}" for group, option in zip(options, combinations[0])]
        assert compose_config("train", chosen) != compose_config("train", [*chosen, "recipe=paper"]), name


def test_the_lever_sweep_measures_every_lever_from_the_papers_recipe():
    cfg, levers, _ = shortcut_levers.settings(["task=coloring", "only=[paper]"])
    assert "recipe=paper" in cfg.train and levers == {"paper": []}
    assert compose_config("train", [f"task={cfg.task}", *cfg.train]).guide.posterior_steps is None


def test_the_lever_sweep_writes_each_levers_curves_and_kl_per_transition(tmp_path):
    out = tmp_path / "levers"
    shortcut_levers.shortcut_levers(["task=nqueens", "only=[paper,first_step]", f"out={out}", "trainer.threads=1",
                                     *(o for o in TINY if not o.startswith("trainer.eval_every")),
                                     "trainer.max_batches=2", "trainer.eval_every=2"])
    with (out / "levers.csv").open() as handle:
        rows = {row["lever"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["paper", "first_step"] and all(row["exit"] == "0" for row in rows.values())
    assert (out / "levers.png").is_file() and (out / "levers_kl.png").is_file()
    # N_sup = 2, T = 2: the paper's posterior acts on the last transition of both steps, first_step's on step 0
    # only (a one-trajectory estimate of log q - log p: nonzero where the posterior acts, of either sign)
    kl = {name: [float(row[f"kl_per_token/{n}/{t}"]) for n in range(2) for t in range(2)] for name, row in rows.items()}
    assert kl["paper"][0] == kl["paper"][2] == 0 and kl["paper"][1] != 0 and kl["paper"][3] != 0, kl
    assert kl["first_step"][0] == kl["first_step"][2] == kl["first_step"][3] == 0 and kl["first_step"][1] != 0, kl


def test_heads_on_the_prior_chain_learn_whether_the_prior_chains_answer_is_correct(data):
    x, y = data
    beta, tokens = 0.5, y.numel()
    objective = TruncatedSurrogate(beta=beta, heads="prior")
    model, _, steps = losses_and_chains_by_hand(objective, data, 6)
    assert objective.prior_chain and objective.cost(model) == 2 * model.n_sup * model.transitions
    for (loss, metrics), (prior, step) in steps:
        correct = ((prior.logits.argmax(-1) == y) | (y < 0)).all(-1).float()
        halt = torch.nn.functional.binary_cross_entropy_with_logits(model.halt_head(prior.h), correct)
        value = (model.value_head(prior.h).sigmoid() - correct).square().mean()
        guided = (-token_log_likelihood(step.logits, y).sum() + beta * step.kl_last.sum()) / tokens
        assert torch.allclose(metrics["halt"], halt, atol=1e-6) and torch.allclose(metrics["value"], value, atol=1e-6)
        assert torch.equal(metrics["prior_acc"], correct.mean())
        assert torch.allclose(loss, guided + halt + value, atol=1e-5, rtol=1e-6), (loss, guided + halt + value)
    with pytest.raises(ValueError, match="unknown heads 'posterior'"):
        TruncatedSurrogate(heads="posterior")
