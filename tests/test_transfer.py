"""Transfer decisions as pure rules: which candidate a task adopts, and which adoptions a round
allows so that the population keeps its diversity."""

import math

from hpc_mto.transfer import choose_source, keep_lineages


def test_adopts_the_largest_gain_only_above_min_gain():
    gains = {1: (0.3, 0.7), 2: (0.5, 0.5), 3: (0.1, 0.9)}
    assert choose_source(gains, min_gain=0.0) == (2, 0.5)
    assert choose_source(gains, min_gain=0.5)[0] is None  # gain 0.5 is not > 0.5
    assert choose_source(gains, min_gain=0.49)[0] == 2
    assert choose_source({1: (-0.1, 1.1)}, min_gain=0.0) == (None, -0.1)  # nobody beats the own model


def test_gains_on_different_samples_pick_the_largest_gain_not_the_lowest_loss():
    # Compared on different unseen samples, a candidate with a higher loss can still gain more.
    assert choose_source({1: (0.05, 0.2), 2: (0.2, 0.6)}, min_gain=0.0)[0] == 2


def test_no_finite_candidate_means_no_adoption_and_a_non_finite_task_adopts_the_lowest_loss():
    assert choose_source({}, min_gain=0.0) == (None, None)
    assert choose_source({1: (math.inf, 3.0), 2: (math.inf, 2.0)}, min_gain=0.0)[0] == 2


ADOPT = lambda own, source: sorted(source)  # `best`: the adopter takes the source's lineage


def test_keep_lineages_takes_adoptions_by_gain_while_half_the_lineages_remain():
    lineages = {0: [0], 1: [1], 2: [2], 3: [3]}
    proposals = [(1, 0, 0.3), (2, 0, 0.5), (3, 0, 0.1)]  # everyone wants task 0's weights
    # 2 (largest gain) goes first -> lineages {0, 1, 3}; then 1 -> {0, 3}; 3 would leave {0}: refused.
    assert keep_lineages(proposals, lineages, keep=2, merged=ADOPT) == {1, 2}
    assert keep_lineages(proposals, lineages, keep=0, merged=ADOPT) == {1, 2, 3}


def test_keep_lineages_allows_an_adoption_within_a_lineage_even_below_the_floor():
    lineages = {0: [0], 1: [0], 2: [2], 3: [0]}  # already only two lineages
    assert keep_lineages([(1, 3, 0.2)], lineages, keep=3, merged=ADOPT) == {1}  # stays at two
    assert keep_lineages([(2, 0, 0.2)], lineages, keep=2, merged=ADOPT) == set()  # would leave one


def test_scored_peers_are_m_distinct_others_drawn_from_seed_round_and_task_alone():
    from hpc_mto.transfer import pairing, scored_peers

    draws = {(r, t): scored_peers(seed=3, round_index=r, task=t, k=16, m=4) for r in range(20) for t in range(16)}
    assert all(len(p) == 4 == len(set(p)) and t not in p and p == sorted(p) and all(0 <= j < 16 for j in p)
               for (r, t), p in draws.items())
    # the same arguments give the same draw (a resumed run, another backend), others another one
    assert all(scored_peers(3, r, t, 16, 4) == p for (r, t), p in draws.items())
    assert len({tuple(p) for p in draws.values()}) > 100
    assert scored_peers(4, 0, 0, 16, 4) != scored_peers(3, 0, 0, 16, 4) or scored_peers(4, 1, 0, 16, 4) != draws[1, 0]
    # every peer gets scored by someone over the rounds: no task is left out of the population
    assert {j for p in draws.values() for j in p} == set(range(16))
    assert scored_peers(3, 0, 2, 4, None) == scored_peers(3, 0, 2, 4, 3) == [0, 1, 3]
    assert pairing(3, 5, 16, None) is None and pairing(3, 5, 16, 4)[7] == draws[5, 7]
