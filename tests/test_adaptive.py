"""`--k auto`: the cost model, the depth chooser, and the invariants that must survive a depth that
changes from step to step (greedy output is vanilla's, sampled output has the target's distribution,
the MTP cache holds exactly the committed text)."""

import itertools
import json
import math
import random
import re

import pytest
import torch
from test_fast_path import _NoSync
from test_sampling_lossless import chi_square_p, exact_joint
from test_sampling_lossless import models as small_vocab_models  # noqa: F401  (a fixture)
from test_sampling_lossless import run as run_sampled

import mtp_spec
from mtp_spec.cli import main
from mtp_spec.decoding.cost import (
    Acceptance,
    CostModel,
    Table,
    best_depth,
    choose_depth,
    depth_rates,
    expected_tokens,
    measure,
)
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import AutoMTPProposer, DecodeState
from mtp_spec.decoding.sampling import SamplingParams
from mtp_spec.decoding.strategies import make_proposer
from mtp_spec.decoding.timing import _FixedDepth, _Plain, measure_steps
from mtp_spec.tokenizer import write_byte_tokenizer


def fake_cost(verify=lambda n, b: 1.0 + 0.1 * n * b, draft=lambda b: 0.2, extend=None) -> CostModel:
    """A hand-made table on n = 1..5, b in (1, 4), not refreshed online: runs are repeatable."""
    ns, bs = range(1, 6), (1, 4)
    ext = None if extend is None else Table({(n, b): extend(n, b) for n in ns for b in bs})
    return CostModel("fake", Table({(n, b): verify(n, b) for n in ns for b in bs}),
                     Table({(1, b): draft(b) for b in bs}), ext, online=False)


class Forced(AutoMTPProposer):
    """The auto proposer with its depths forced to a cycle, to exercise every switch (0 -> k -> 0)."""

    def __init__(self, model, seq, k_max=4):
        super().__init__(model, k_max, cost=fake_cost())
        self.seq = seq

    def reset(self, batch, max_len):
        super().reset(batch, max_len)
        self.it = itertools.cycle(self.seq)

    def choose(self, st):
        return next(self.it)


class SteeredAuto(AutoMTPProposer):
    """The real chooser, with drafts steered towards the known continuation so that acceptance is high
    sometimes and the chooser has reasons to go deep as well as to stop drafting."""

    def __init__(self, model, refs, seed):
        super().__init__(model, 4, cost=fake_cost(verify=lambda n, b: 1.0 + 0.1 * n), probe_every=3)
        self.refs, self.rng = refs, random.Random(seed)

    def _draft_from(self, logits, h, st, sp, k):
        out = super()._draft_from(logits, h, st, sp, k)
        for r, toks in enumerate(st.tokens):
            ref = self.refs[r][len(toks):len(toks) + out.n]
            cut = self.rng.randint(0, len(ref))
            out.tokens[r, :cut] = torch.tensor(ref[:cut], dtype=torch.long)
        return out


@pytest.fixture(scope="module", params=["off", "auto"])
def model(tiny_fp8, request):
    return mtp_spec.load(tiny_fp8, max_len=160, compile=request.param)


def _prompts(seed, batch):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(1, 24, (batch,), generator=g)]


# --- the cost model -------------------------------------------------------------------------------
def test_expected_tokens_is_one_plus_the_sum_of_prefix_products():
    p = [0.8, 0.5, 0.25]
    assert expected_tokens(p, 0) == 1.0
    assert expected_tokens(p, 1) == pytest.approx(1.8)
    assert expected_tokens(p, 2) == pytest.approx(1 + 0.8 + 0.4)
    assert expected_tokens(p, 3) == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    assert expected_tokens([1.0] * 4, 4) == 5.0


def test_times_are_linear_between_points_held_below_and_extended_above():
    t = Table({(1, 1): 1.0, (3, 1): 2.0, (1, 4): 4.0, (3, 4): 8.0})
    assert t(2, 1) == pytest.approx(1.5)  # linear in n
    assert t(1, 2) == pytest.approx(2.0)  # linear in b
    assert t(2, 2) == pytest.approx((1.5 * 2 + 6.0) / 3)  # n first, then b
    assert t(1, 0.5) == 1.0 and t(0, 1) == 1.0  # below the measured range: the edge value
    assert t(5, 1) == pytest.approx(3.0)  # above: the last segment continues
    assert t(1, 10) == pytest.approx(10.0)
    assert Table({(1, 1): 2.0, (2, 1): 1.0})(9, 1) == 1.0  # never falling above the range
    assert Table({(2, 3): 0.5})(7, 9) == 0.5  # one point: flat


def test_step_time_is_what_the_mtp_proposer_runs():
    c = fake_cost(verify=lambda n, b: n * b * 1.0, draft=lambda b: 0.5 * b, extend=lambda n, b: 0.25 * n * b)
    assert c.step_time(0, 1) == 1.0  # plain decoding
    assert c.step_time(1, 1) == pytest.approx(2.0 + 0.5)  # verify 2, extend 2
    assert c.step_time(3, 4) == pytest.approx(16.0 + 4.0 + 2 * 2.0)  # verify 4, extend 4, two chained drafts
    assert fake_cost(draft=lambda b: 0.3).extend(4, 1) == 0.3  # no extend table: an extend costs a draft step
    assert c.tokens_per_s([0.5], 1, 4, active=2) == pytest.approx(2 * 1.5 / c.step_time(1, 4))


def test_a_step_of_depth_k_runs_one_extend_and_k_minus_1_draft_steps(model, monkeypatch):
    calls = []
    fwd = type(model.mtp).forward

    def counted(self, tokens, *a, **kw):
        calls.append(tokens.shape[1])
        return fwd(self, tokens, *a, **kw)

    prop = Forced(model, [3])
    monkeypatch.setattr(type(model.mtp), "forward", counted)
    Engine(model, prop).generate([[5, 9, 200, 31]], 9)
    # the prompt's extend, then per step: an extend of the k + 1 committed tokens and k - 1 chained steps
    assert calls[0] == 4 and calls[1:4] == [1, 1, 4] and calls[4:7] == [1, 1, 4]


def test_online_the_pace_moves_every_depth_and_a_depth_keeps_its_own_ratio():
    c = fake_cost(verify=lambda n, b: 1.0, draft=lambda b: 0.5)
    c.online = True
    assert c.step_time(2, 4) == pytest.approx(1.0 + 0.5 + 0.5)  # verify 3, extend 3, one draft step
    assert c.step_time(0, 4) == 1.0 and c.speed(4) == 1.0  # nothing seen: the table
    # drafting steps at twice the table: one or two move nothing, a majority of the window moves the pace,
    # and with it every depth without steps of its own, plain decoding included
    c.observe_step(1, 4, seconds=4.0, mtp_seconds=1.0)  # table: verify(2) + an extend of 3 waiting tokens
    c.observe_step(1, 4, seconds=4.0, mtp_seconds=1.0)
    assert c.speed(4) == 1.0
    c.observe_step(2, 4, seconds=4.0, mtp_seconds=1.0)  # 2x again, another depth: the pace is shared
    c.observe_step(1, 4, seconds=4.0, mtp_seconds=1.0)
    c.observe_step(1, 4, seconds=4.0, mtp_seconds=1.0)
    assert c.speed(4) == pytest.approx(2.0) and c.step_time(0, 4) == pytest.approx(2.0)
    assert c.step_time(3, 4) == pytest.approx(2 * (1.0 + 0.5 + 2 * 0.5))  # a depth never run: the pace
    # a depth with a majority of a window of its own steps is priced by them
    for _ in range(3):
        c.observe_step(3, 4, seconds=7.5, mtp_seconds=1.5)  # 3x its table
    assert c.factor(3, 4) == pytest.approx(3.0) and c.factor(1, 4) == pytest.approx(2.0)
    assert c.factor(2, 4) == c.speed(4) == pytest.approx(2.0)  # one step of its own: the pace
    # a plain step's catch-up extend is priced as part of its table time
    c.observe_step(0, 4, seconds=4.0, mtp_seconds=1.0)  # 2x of verify(1) + 1.0
    assert c.speed(4) == pytest.approx(2.0)
    # one slow step among many moves nothing; a new batch pulls the own ratios halfway to the pace
    c.observe_step(0, 4, seconds=50.0, mtp_seconds=0.0)
    assert c.speed(4) == pytest.approx(2.0)
    c.forget()
    assert c.factor(3, 4) == pytest.approx(2.5) and c.factor(1, 4) == pytest.approx(2.0)
    # a batch size never run starts from the pace of all recent steps, then its own takes over
    assert c.speed(2) == pytest.approx(2.0)
    for _ in range(5):
        c.observe_step(0, 2, seconds=0.5, mtp_seconds=0.0)
    assert c.speed(2) == pytest.approx(0.5) and c.speed(4) == pytest.approx(2.0)
    c.online = False  # never refreshed
    c.observe_step(0, 2, seconds=9.0, mtp_seconds=0.0)
    assert c.speed(2) == pytest.approx(0.5) and c.verify(1, 2) == 1.0


def test_plain_decodings_price_follows_the_machine_while_auto_drafts():
    """The machine gets faster while auto drafts (a warm-up on a busy CPU): drafting steps take 0.6 of
    the table. With plain decoding's price refreshed by plain steps alone, it stayed at the warm-up
    value and drafting looked 1.5x better than it was; the shared pace scales both alike."""
    c = fake_cost(verify=lambda n, b: {1: 1.0, 2: 1.4}.get(n, 2.0), draft=lambda b: 0.1, extend=lambda n, b: 0.1)
    c.online = True
    p = [[0.3]]  # 1.3 tokens a step at k = 1: 1.3 / 1.5 of plain decoding's rate by the table
    assert choose_depth(c, 1, p, 1) == 0
    for _ in range(9):
        c.observe_step(1, 1, seconds=0.9, mtp_seconds=0.1)
    assert choose_depth(c, 1, p, 1) == 0 and c.step_time(0, 1) == pytest.approx(0.6)


def test_the_chooser_reads_the_engines_whole_steps_where_they_were_timed(model):
    """The forwards' sum put k = 1 ahead; the engine's whole steps, timed per depth, say it is not."""
    c = fake_cost()
    p = [[0.5]]
    assert choose_depth(c, 1, p, 1) == 1  # 1.5 / (verify(2) 1.2 + extend 0.2) against 1 / 1.1
    c.step_table = Table({(1, 1): 1.0, (2, 1): 2.0})
    assert choose_depth(c, 1, p, 1) == 0 and c.table_time(1, 1) == 2.0
    # a step whose MTP parts differ from a steady one (an extend of 6 waiting tokens) is priced by the difference
    assert c.table_time(1, 1, mtp_seconds=0.5) == pytest.approx(2.3)
    measure_steps(model, c, (1, 2), 2)
    pts = c.step_table.points
    assert set(pts) == {(n, b) for n in (1, 2, 3) for b in (1, 2)} and all(t > 0 for t in pts.values())
    assert all(pts[(n, b)] <= pts[(n + 1, b)] for n in (1, 2) for b in (1, 2))
    assert set(c.off_table.points) == {(1, 1), (1, 2)} and c.step_time(0, 2) == c.off_table(1, 2)
    # plain decoding is priced as decoding with drafting off: what the batch gets by stopping
    c.off_table = Table({(1, 1): 1.5})
    c.step_table = Table({(1, 1): 1.0, (2, 1): 2.0})
    assert c.step_time(0, 1) == 1.5 and c.step_time(1, 1) == 2.0 and choose_depth(c, 1, p, 1) == 1
    c.off_table = Table({(1, 1): 1.2})  # 1.5 tokens in 2.0 against one in 1.2
    assert choose_depth(c, 1, p, 1) == 0 and choose_depth(c, 1, [[0.8]], 1) == 1
    assert not c.paces and not c.owns  # timing the depths teaches the chooser nothing of a run


def test_a_step_with_drafting_off_is_measured_against_the_table_that_prices_it():
    """Plain decoding is priced by `off_table`; a step with drafting off that took what that table
    says must leave plain decoding's price where it was. Measured against the plain step that keeps
    the MTP layer ready (1.1 here), it read 0.91 and priced plain decoding 9% low for the next batch."""
    c = fake_cost()
    c.online = True
    c.step_table = Table({(1, 1): 1.1, (2, 1): 1.5})
    c.off_table = Table({(1, 1): 1.0})
    for _ in range(9):
        c.observe_step(0, 1, seconds=1.0, mtp_seconds=0.0, off=True)
    assert c.speed(1) == pytest.approx(1.0) and c.step_time(0, 1) == pytest.approx(1.0)
    c.forget()
    assert c.step_time(0, 1) == pytest.approx(1.0) and c.step_time(1, 1) == pytest.approx(1.5)
    for _ in range(9):  # the same steps taken for plain steps that keep the MTP layer ready
        c.observe_step(0, 1, seconds=1.0, mtp_seconds=0.0)
    assert c.step_time(0, 1) == pytest.approx(1.0) and c.step_time(1, 1) == pytest.approx(1.5 / 1.1)


def test_plain_steps_that_keep_the_mtp_layer_ready_do_not_price_plain_decoding():
    """A batch decodes plainly, MTP layer ready, at 0.7 of that step's table point (a warm-up point
    read high): plain decoding's price, set by steps with drafting off, stays; with one ratio for
    both, it fell 30% and batches where drafting paid turned it off."""
    c = fake_cost(verify=lambda n, b: 1.0, draft=lambda b: 0.5)
    c.online = True
    c.step_table = Table({(1, 1): 1.0, (2, 1): 2.0})
    c.off_table = Table({(1, 1): 0.9})
    for _ in range(5):
        c.observe_step(0, 1, seconds=0.9, mtp_seconds=0.0, off=True)
    for _ in range(9):
        c.observe_step(0, 1, seconds=0.7, mtp_seconds=0.0)
    assert c.speed(1) == pytest.approx(0.7) and c.factor(0, 1) == pytest.approx(0.7)
    assert c.step_time(0, 1) == pytest.approx(0.9) and c.step_time(1, 1) == pytest.approx(1.4)


def test_a_batch_is_worth_what_its_slowest_row_gets():
    """A batch returns when its last row is done: one row that drafts badly decides, however well the
    others draft; and a row's last token takes a step at any depth."""
    c = fake_cost()  # batch 1 of the table: a plain step 1.1, k = 1 1.4
    rows = [[0.9], [0.1]]
    summed = depth_rates(c, 1, rows, 1)
    assert summed[1] > summed[0]  # 2.9 tokens in 1.4 against 2 in 1.1
    finish = depth_rates(c, 1, rows, 1, remaining=[30, 30])
    assert finish[0] > finish[1]  # the second row: 30 steps of 1.1 against 30 / 1.1 of 1.4
    assert finish[0] == pytest.approx(60 / (30 * 1.1)) and finish[1] == pytest.approx(60 / (30 / 1.1 * 1.4))
    assert best_depth(depth_rates(c, 1, [[0.9]], 1, remaining=[30])) == 1
    assert best_depth(depth_rates(c, 1, [[0.9]], 1, remaining=[1])) == 0  # the last token: one step either way


def test_a_depth_with_steps_of_its_own_is_judged_by_them():
    """The table puts k = 2 a little behind k = 1 (its verify(3) a few percent high, as a line through
    a CPU kernel's flat steps did); k = 2's own steps, faster than the table, turn the choice. With one
    ratio shared by both depths, k = 2's steps made k = 1 look faster by as much, and k = 1 stayed."""
    c = fake_cost(verify=lambda n, b: {1: 1.0, 2: 1.05, 3: 1.3}.get(n, 2.0), draft=lambda b: 0.02,
                  extend=lambda n, b: 0.02)
    c.online = True
    p = [[0.6, 0.45]]
    assert choose_depth(c, 1, p, 2) == 1  # 1.6 / 1.07 against 1.87 / 1.34
    for _ in range(5):
        c.observe_step(1, 1, seconds=1.07, mtp_seconds=0.02)  # k = 1 as the table says
    for _ in range(3):
        c.observe_step(2, 1, seconds=1.14, mtp_seconds=0.04)  # k = 2 0.2 below the table
    assert c.speed(1) == pytest.approx(1.0) and c.factor(2, 1) == pytest.approx(1.14 / 1.34)
    assert choose_depth(c, 1, p, 2) == 2


def test_auto_times_a_shape_seen_in_an_earlier_batch(model, monkeypatch):
    """The first run of a step shape (depth, extend width, batch) is not timed (its warm-up), once per
    proposer, not per batch: a depth run on probes alone (one or two a batch) is measured too."""
    prop = Forced(model, [1, 2, 0])
    timed = []
    monkeypatch.setattr(prop.cost, "observe_step", lambda k, b, s, m, off=False: timed.append(k))
    counts = []
    for _ in range(2):  # the same batch twice: greedy, the same depths, the same shapes
        timed.clear()
        res = Engine(model, prop).generate([[5, 9, 200, 31]], 16)
        counts.append((len(timed), sum(res[0].metrics.steps_per_k)))
    (first, steps), (second, steps2) = counts
    assert steps == steps2 and second == steps - 1  # all but the step that extended the prompt
    assert first == second - len(prop.timed) and len(prop.timed) >= 3


def test_auto_traces_what_its_chooser_saw_at_every_step(model):
    """One entry per step the chooser ran: the depth chosen (-1 where it turned drafting off), the best
    drafting depth's predicted throughput over plain decoding's, the pace, and that depth's ratio."""
    prop = AutoMTPProposer(model, 2, cost=fake_cost(), prior=[0.9])
    res = Engine(model, prop).generate([[5, 9, 200, 31]], 12)
    ks = [k for k, *_ in prop.trace]
    per_k = res[0].metrics.steps_per_k
    assert len(ks) == sum(per_k) and all(ks.count(k) == n for k, n in enumerate(per_k))
    # k = 2 first: 1 + 0.9 + 0.81 tokens in verify(3) + extend + a draft step (1.3 + 0.2 + 0.2) against
    # one token in 1.1
    assert prop.trace[0][0] == 2 and prop.trace[0][1] == pytest.approx(2.71 / 1.7 * 1.1, abs=1e-3)
    prop = AutoMTPProposer(model, 2, cost=fake_cost(draft=lambda b: 50.0))  # drafting never pays: off at once
    Engine(model, prop).generate([[5, 9, 200, 31]], 6)
    assert len(prop.trace) == 1 and prop.trace[0][0] == -1 and prop.trace[0][1] < 0.1


def test_cost_table_json_round_trip_and_errors(tmp_path, tiny_fp8):
    m = mtp_spec.load(tiny_fp8, max_len=64, compile="auto")
    c = measure(m, batches=(1, 2), tokens=(1, 3), max_len=64, repeats=1)
    d = c.to_json()
    assert d["device"] == "cpu" and {len(r) for r in d["verify"]} == {3} and {len(r) for r in d["draft"]} == {2}
    assert sorted((n, b) for n, b, _ in d["verify"]) == [(1, 1), (1, 2), (3, 1), (3, 2)]
    assert all(s > 0 for *_, s in d["verify"] + d["draft"] + d["extend"])
    c.save(tmp_path / "costs.json")
    back = CostModel.load(tmp_path / "costs.json")
    assert back.to_json() == json.loads(json.dumps(d))
    assert CostModel.from_json({"device": "x", "verify": [[1, 1, 0.1]], "draft": [[1, 0.01]]}).extend(3, 1) == 0.01
    for bad, msg in [({"verify": [[1, 1, 0.1]], "draft": [[1, 0.1]]}, "device"),
                     ({"device": "x", "verify": [[1, 0.1]], "draft": [[1, 0.1]]}, "'verify' row"),
                     ({"device": "x", "verify": [[1, 1, 0.1]]}, "'draft'"),
                     ({"device": "x", "verify": [[0, 1, 0.1]], "draft": [[1, 0.1]]}, "'verify' row")]:
        with pytest.raises(ValueError, match=msg):
            CostModel.from_json(bad)


# --- acceptance and the chooser --------------------------------------------------------------------
def test_acceptance_counts_positions_tried_only():
    a = Acceptance([0.5, 0.5, 0.5], weight=2.0)
    a.update(drafted=3, accepted=1)  # position 1 accepted, 2 rejected, 3 not tried
    a.update(drafted=0, accepted=0)  # a plain step: nothing
    assert a.hits == [1, 0, 0] and a.trials == [1, 1, 0]
    assert a.means() == pytest.approx([2 / 3, 1 / 3, 0.5])


def test_chooser_picks_zero_when_drafts_cost_more_than_they_bring():
    c = fake_cost(verify=lambda n, b: 1.0, draft=lambda b: 0.6)
    assert choose_depth(c, 4, [[0.5] * 4] * 4, 4) == 0  # 1.5 tokens for 1.6x the time
    assert choose_depth(c, 4, [[0.7] * 4] * 4, 4) == 1  # 1.7 tokens for 1.6x the time


def test_chooser_picks_k_max_when_acceptance_is_one_and_drafts_are_free():
    c = fake_cost(verify=lambda n, b: 1.0, draft=lambda b: 0.0)
    assert choose_depth(c, 2, [[0.999] * 4, [1.0] * 4], 4) == 4


def test_chooser_maximises_the_whole_batch_throughput():
    # verify grows with n * b: deeper steps at batch 4 pay only when most rows would accept
    c = fake_cost(verify=lambda n, b: 1.0 + 0.3 * n * b, draft=lambda b: 0.0)
    good, bad = [0.9] * 4, [0.0] * 4
    assert choose_depth(c, 4, [good] * 4, 4) > 0
    assert choose_depth(c, 4, [good] + [bad] * 3, 4) == 0
    assert choose_depth(c, 1, [[0.5] * 4], 4) > 0 and choose_depth(c, 4, [[0.5] * 4] * 4, 4) == 0


def test_auto_probes_neighbouring_depths_now_and_then(model):
    # k = 1 is best throughout (cheap extend, dear draft steps); 0 and 2 are probed in turn, 3 never
    cost = fake_cost(draft=lambda b: 0.9, extend=lambda n, b: 0.0)
    prop = AutoMTPProposer(model, 3, cost=cost, probe_every=3, prior=[0.9])
    res = Engine(model, prop).generate([[5, 9, 200, 31]], 20)
    per_k = res[0].metrics.steps_per_k
    assert len(per_k) == 3 and per_k[1] > per_k[0] > 0 and per_k[2] > 0, per_k


class _CountMTP:
    """Counts the MTP layer's forwards (extends, draft steps) and the step each one ran in."""

    def __init__(self, monkeypatch, model):
        self.steps: list[int] = []
        self.step = 0
        inner = model.mtp.forward
        monkeypatch.setattr(model.mtp, "forward", lambda *a, **kw: (self.steps.append(self.step), inner(*a, **kw))[1])


@pytest.mark.parametrize("costly", [False, True])
def test_a_first_probe_runs_only_where_extending_the_prompts_is_cheap(model, monkeypatch, costly):
    """Nothing drafted yet, k = 1 predicted level with plain decoding (within `margin`, short of
    `switch_on`): after `probe_every` plain steps the chooser probes k = 1 if the MTP layer's extend of
    the waiting prompt costs at most `prefill_steps` plain steps by the table, else turns off."""
    ext = (lambda n, b: 0.05 * (n - 1) ** 2) if costly else (lambda n, b: 0.0)  # 7.5 steps at n = 24
    cost = fake_cost(verify=lambda n, b: 1.0 if n == 1 else 1.5, draft=lambda b: 0.0, extend=ext)
    prop = AutoMTPProposer(model, 1, cost=cost, probe_every=4, prior=[0.5])
    count = _CountMTP(monkeypatch, model)
    prompt = list(range(5, 25))
    got = Engine(model, prop).generate([prompt], 12)
    assert got[0].token_ids == Engine(model).generate([prompt], 12)[0].token_ids
    if costly:
        assert prop.off and count.steps == [] and len(got[0].metrics.steps_per_k) == 1  # k = 0 only
    else:
        assert count.steps and got[0].metrics.steps_per_k[1] >= 1  # probed (then off: the probe changed nothing)


def test_before_anything_drafted_the_first_probe_comes_soon_and_off_follows_a_probe_that_changed_nothing(model):
    """k = 1 predicted level with plain decoding (within `margin`): a quarter of `probe_every` plain
    steps, one probe, and off at once when plain decoding is chosen again (not another `probe_every`
    plain steps first, each dearer than decoding with drafting off)."""
    cost = fake_cost(verify=lambda n, b: 1.0 if n == 1 else 1.5, draft=lambda b: 0.0, extend=lambda n, b: 0.0)
    prop = AutoMTPProposer(model, 1, cost=cost, probe_every=8, prior=[0.5])
    got = Engine(model, prop).generate([[5, 9, 200, 31]], 16)
    assert [k for k, *_ in prop.trace] == [0, 0, 1, -1] and prop.off
    assert got[0].token_ids == Engine(model).generate([[5, 9, 200, 31]], 16)[0].token_ids


def test_starting_to_draft_must_save_more_than_the_extend_it_costs(model):
    """From plain decoding, a depth predicted faster is taken when the time it saves over the rest of
    the batch beats the extend of all that waited; near the end of a batch it is not."""
    prop = AutoMTPProposer(model, 1, cost=fake_cost(extend=lambda n, b: 0.05 if n <= 2 else 0.5 * n), prior=[0.9])
    prop.reset(1, 64)
    st = DecodeState([[5, 9, 200, 31, 7]], [True], [torch.Generator()], [4], torch.tensor([7]),
                     torch.ones(1, dtype=torch.bool), next_tokens=torch.zeros(1, 5, dtype=torch.long))
    for left, start in [(60, True), (2, False)]:  # saves 66 - 39.5 (or 2.2 - 1.32) against extend(5) = 2.5
        st.remaining = [left]
        rates = depth_rates(prop.cost, 1, [[0.9]], 1, st.remaining)
        assert rates[1] > rates[0] and prop._worth_starting(st, rates, 1) is start


@pytest.mark.parametrize("why", ["margin", "probes"])
def test_auto_turns_speculation_off_for_the_batch_where_it_does_not_pay(model, monkeypatch, why):
    """Off after `probe_every` plain steps in a row where no step has drafted yet or no depth comes
    within `margin` of plain decoding (at once where both hold); else after a probe that changed nothing. Off means the
    MTP layer never runs again in that batch (no catch-up, no probe); the output is vanilla's, and
    the next batch starts with speculation on."""
    if why == "margin":  # drafting costs 100x a step: the MTP layer never runs, not even on the prompts
        prop = AutoMTPProposer(model, 1, cost=fake_cost(draft=lambda b: 100.0), probe_every=4)
    else:  # a free MTP layer and verify(2) = 1.56 verify(1): k = 1 pays while acceptance > 0.56;
        # the random model's drafts are rejected, so the chooser drafts, then stops, probes, turns off
        cost = fake_cost(verify=lambda n, b: 1.0 if n == 1 else 1.56, draft=lambda b: 0.0, extend=lambda n, b: 0.0)
        prop = AutoMTPProposer(model, 1, cost=cost, probe_every=4, prior=[0.9], margin=0.5)
    count = _CountMTP(monkeypatch, model)
    orig = prop.propose
    off_at = []

    def propose(st, sp):
        count.step += 1
        out = orig(st, sp)
        if prop.off and not off_at:
            off_at.append(count.step)
        return out

    prop.propose = propose
    prompts = _prompts(7, 3)
    ref = Engine(model).generate(prompts, 40)
    for batch in range(2):  # the second batch turns it off again: it started on
        count.steps.clear()
        count.step, off_at[:] = 0, []
        got = Engine(model, prop).generate(prompts, 40)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
        per_k = got[0].metrics.steps_per_k
        assert off_at and max(count.steps, default=0) < off_at[0] < got[0].metrics.num_steps - 10 or \
            count.steps == [] and off_at == [1], (off_at, per_k)
        if why == "margin":  # off at the first step
            assert count.steps == [] and off_at == [1]
        elif batch == 0:
            assert per_k[1] >= 2 and count.steps, per_k  # drafted, then probed once


# --- invariants under a changing depth ------------------------------------------------------------
@pytest.mark.parametrize("seq", [[0, 3, 1, 0, 2], [0] * 12 + [1], [4, 0, 0, 1, 0, 3], [2]])
def test_greedy_auto_equals_vanilla_for_forced_depth_sequences(model, seq):
    for seed, batch in [(0, 1), (1, 3), (2, 6)]:
        prompts = _prompts(seed, batch)
        ref = Engine(model).generate(prompts, 26)
        eos = ref[0].token_ids[len(ref[0].token_ids) // 2]  # row 0 stops mid-way
        ref = Engine(model).generate(prompts, 26, eos_id=eos)
        got = Engine(model, Forced(model, seq)).generate(prompts, 26, eos_id=eos)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert b.token_ids == a.token_ids, f"seq {seq} seed {seed} row {i}"
            assert b.finish_reason == a.finish_reason
        for r in got:  # every row ran the first num_steps depths of the cycle
            cycle = list(itertools.islice(itertools.cycle(seq), r.metrics.num_steps))
            assert r.metrics.steps_per_k == [cycle.count(k) for k in range(max(cycle) + 1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_auto_with_the_real_chooser_equals_vanilla(model, seed):
    batch = [1, 4, 7][seed]
    prompts = _prompts(10 + seed, batch)
    ref = Engine(model).generate(prompts, 30)
    refs = [p + r.token_ids for p, r in zip(prompts, ref)]
    prop = SteeredAuto(model, refs, seed)
    got = Engine(model, prop).generate(prompts, 30)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    per_k = got[0].metrics.steps_per_k
    assert len([n for n in per_k if n]) >= 2, per_k  # the depth did change
    plain = Engine(model, AutoMTPProposer(model, 3, cost=fake_cost())).generate(prompts, 30)  # unsteered
    assert [r.token_ids for r in plain] == [r.token_ids for r in ref]


@torch.no_grad()
@pytest.mark.parametrize("seq", [[0, 3, 1, 0, 2], [1, 0, 0, 0], [0] * 11 + [2]])
def test_switching_depths_keeps_the_mtp_cache_equal_to_a_fresh_pass(model, seq):
    prompts = _prompts(40, 3)
    prop = Forced(model, seq)
    res = Engine(model, prop).generate(prompts, 24)
    if prop.pending is not None:  # the pairs still waiting go in too, so that they are checked as well
        prop._flush()
    for i in range(len(prompts)):
        text = torch.tensor([prompts[i] + res[i].token_ids])
        n = text.shape[1] - 1
        hidden = model(text[:, :n]).hidden_states
        m = int(prop.cache.lengths[i])
        # all but the pairs of the row's last step (a finished row's are dropped; the longest row keeps them)
        assert n - (max(seq) + 1) <= m <= n
        fresh = model.mtp.new_cache(1, 64)
        model.mtp(text[:, 1:m + 1], hidden[:, :m], cache=fresh)
        torch.testing.assert_close(prop.cache.layer(0)[0][i, :m], fresh.layer(0)[0][0, :m], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq", [[0] * 11 + [3, 1], None])
def test_an_auto_step_reads_back_once(tiny_fp8, seq):
    """Choosing the depth, queueing and catching up read nothing: the one read-back per step stays."""
    model = mtp_spec.load(tiny_fp8, max_len=96, compile="auto")
    prop = Forced(model, seq) if seq else AutoMTPProposer(model, 3, cost=fake_cost(), probe_every=2)
    prompts = _prompts(3, 3)
    with _NoSync() as spy:
        res = Engine(model, prop).generate(prompts, 24)
    steps = max(r.metrics.num_steps for r in res)
    assert spy.calls == ["tolist"] * (steps + 1)  # the prefill's first tokens, then one per step


@pytest.mark.parametrize("chooser", ["forced", "real"])
def test_sampled_auto_keeps_the_target_distribution(small_vocab_models, chooser):  # noqa: F811
    target, _ = small_vocab_models
    sp = SamplingParams(temperature=1.0)
    prop = Forced(target, [1, 0, 2]) if chooser == "forced" else \
        AutoMTPProposer(target, 2, cost=fake_cost(verify=lambda n, b: 1 + 0.2 * n, draft=lambda b: 0.01))
    samples, drafted, accepted = run_sampled(target, prop, sp)
    assert 0.01 * drafted < accepted < 0.99 * drafted, (drafted, accepted)
    p = chi_square_p(samples, exact_joint(target, sp))
    assert p > 1e-3, f"{chooser}: chi-square p = {p:.2e}"


# --- the API and the CLI ---------------------------------------------------------------------------
def test_make_proposer_auto_and_its_errors(model):
    prop = make_proposer("mtp", model, "auto", k_max=3, cost=fake_cost())
    assert isinstance(prop, AutoMTPProposer) and prop.k_max == prop.max_nodes == 3
    with pytest.raises(ValueError, match="auto works with strategy 'mtp' only"):
        make_proposer("ngram", model, "auto")
    with pytest.raises(ValueError, match="k must be >= 1"):
        make_proposer("mtp", model, 0)


def test_generate_defaults_to_auto_depth_and_records_it(tiny_fp8, capsys):
    write_byte_tokenizer(tiny_fp8)
    args = ["generate", "--model", str(tiny_fp8), "--prompt-ids", "5,6,7,5,6", "--max-new-tokens", "10", "--json"]
    assert main(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["strategy"] == "mtp" and rec["k"] == "auto"
    assert sum(rec["steps_per_k"]) >= 1 and len(rec["steps_per_k"]) <= 5
    main(args + ["--strategy", "vanilla"])
    assert json.loads(capsys.readouterr().out)["token_ids"] == rec["token_ids"]
    main(args + ["--k", "2"])
    assert json.loads(capsys.readouterr().out)["k"] == 2
    assert main(args + ["--strategy", "ngram", "--k", "auto"]) == 2
    assert "--k auto works with --strategy mtp only" in capsys.readouterr().err


def test_compare_rounds_alternate_and_each_starts_from_what_auto_knew(tiny_fp8, capsys, monkeypatch):
    write_byte_tokenizer(tiny_fp8)
    seen = []  # what auto has learned when each of its runs starts: acceptance counts, step times
    order = []  # which engine ran, in turn
    start, generate = AutoMTPProposer.reset, Engine.generate

    def reset(self, batch, max_len):
        if not isinstance(self, _FixedDepth):  # the warm-up's timing of each depth is not a run
            seen.append((sum(self.record.trials), len(self.cost.paces)))
        start(self, batch, max_len)

    def logged(self, *args, **kwargs):
        if not isinstance(self.proposer, (_FixedDepth, _Plain)):
            order.append("mtp" if isinstance(self.proposer, AutoMTPProposer) else "vanilla")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(AutoMTPProposer, "reset", reset)
    monkeypatch.setattr(Engine, "generate", logged)
    monkeypatch.setattr(AutoMTPProposer, "choose", lambda self, st: 1)  # always drafts: the record learns
    args = ["generate", "--model", str(tiny_fp8), "--prompt-ids", "5,6,7,5,6", "--max-new-tokens", "12", "--json",
            "--compare", "--compare-rounds", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    rec = json.loads(next(ln for ln in out if ln.startswith("{")))
    assert "(median of 3 rounds, each run in turn: " in out[-1]
    assert len(rec["speedup_rounds"]) == 3 and rec["speedup"] == sorted(rec["speedup_rounds"])[1]
    assert rec["equals_vanilla"] is True
    assert seen == [(0, 0)] * 4  # the warm-up run and three rounds: each from the state before the warm-up
    assert order == ["mtp", "vanilla"] * 2 + ["vanilla", "mtp", "mtp", "vanilla"]  # warm-up, then rounds 1-3
    assert main(args[:-1] + ["0"]) == 2
    assert "--compare-rounds must be >= 1, got 0" in capsys.readouterr().err


def test_auto_starts_from_the_acceptance_recorded_beside_the_model(tiny_fp8, tmp_path):
    import shutil

    from mtp_spec.decoding.cost import PRIOR_FILE

    d = shutil.copytree(tiny_fp8, tmp_path / "m")
    model = mtp_spec.load(d, max_len=64)
    assert make_proposer("mtp", model, "auto", k_max=3, cost=fake_cost()).prior == [0.5] * 3  # none recorded
    (d / PRIOR_FILE).write_text(json.dumps({"conditional": [0.9, 0.25], "source": "a test"}))
    prop = make_proposer("mtp", model, "auto", k_max=3, cost=fake_cost())
    assert prop.prior == [0.9, 0.25, 0.25]
    prop.reset(2, 64)
    assert [r.means() for r in prop.rows] == [[0.9, 0.25, 0.25]] * 2
    for bad, why in (({"conditional": [1.5]}, "acceptance rates in \\[0, 1\\]"), ([0.5], "not a JSON object")):
        (d / PRIOR_FILE).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(str(d / PRIOR_FILE)) + f": .*{why}"):
            make_proposer("mtp", model, "auto", cost=fake_cost())


def test_the_report_predicts_a_fixed_k_cell_from_the_cost_table():
    from mtp_spec.experiment.report import predicted_speedup

    cost = CostModel.from_json({"device": "cpu", "verify": [[1, 1, 0.010], [3, 1, 0.012]], "draft": [[1, 0.002]]})
    # k = 2: verify(3) + extend(3) (= draft without an extend table) + one draft step = 16 ms for
    # 1 + 0.8 + 0.8 * 0.5 = 2.2 tokens, against 1 token per 10 ms
    assert predicted_speedup(cost, [0.8, 0.5], 2, 1) == pytest.approx(2.2 * 10 / 16)
    assert math.isnan(predicted_speedup(cost, [0.8, 0.5], "auto", 1))
    assert math.isnan(predicted_speedup(None, [0.8], 1, 1))


def test_measured_tables_are_smoothed_to_the_nearest_curve_that_does_not_fall():
    from mtp_spec.decoding.cost import Table, smooth

    t = Table({(1, 1): 3.6, (2, 1): 4.5, (3, 1): 5.6, (4, 1): 4.4, (5, 1): 4.2,  # noisy, from a busy CPU
               (1, 4): 5.0, (2, 4): 4.0, (3, 4): 3.0, (1, 8): 7.0, (2, 8): 9.0,
               (1, 2): 1.0, (2, 2): 1.07, (3, 2): 1.06, (4, 2): 1.5, (64, 2): 3.0})
    smooth(t)
    assert [t.points[(n, 1)] for n in range(1, 6)] == pytest.approx([3.6, 4.5] + [14.2 / 3] * 3)  # tail pooled
    assert [t.points[(n, 4)] for n in (1, 2, 3)] == pytest.approx([4.0] * 3)  # falling: flat at the mean
    assert (t.points[(1, 8)], t.points[(2, 8)]) == (7.0, 9.0)  # rising: left as measured
    # a kernel's steps survive (flat while the rows fit one pass, then a jump), a line through them would not
    assert [t.points[(n, 2)] for n in (1, 2, 3, 4, 64)] == pytest.approx([1.0, 1.065, 1.065, 1.5, 3.0])


def test_measure_times_a_prompt_sized_extend(tiny_fp8):
    m = mtp_spec.load(tiny_fp8, max_len=256, compile="auto")
    c = measure(m, batches=(1,), tokens=(1, 2), max_len=256, repeats=1, prompt=64)
    assert sorted(c.extend_table.points) == [(1, 1), (2, 1), (64, 1)]
    assert sorted(c.verify_table.points) == [(1, 1), (2, 1)]  # verify is not timed at the prompt's width
    assert c.extend(64, 1) >= c.extend(2, 1)
    small = measure(m, batches=(1,), tokens=(1, 2), max_len=64, repeats=1, prompt=64)  # no room: not timed
    assert sorted(small.extend_table.points) == [(1, 1), (2, 1)]
