"""dejavu.placement.plan: which cores and threads each engine gets under `dejavu up --cpu-placement`."""

from __future__ import annotations

import pytest

from dejavu.placement import Placement, describe, plan


def test_one_engine_per_core_disjoint():
    placements = plan([0, 1], prompt_services=1, token_services=1, mode="split")
    assert placements == {"prompt-0": Placement((0,), 1), "token-0": Placement((1,), 1)}
    assert describe(placements, [0, 1]) == "prompt-0 cores 0, token-0 cores 1 (1 thread each)"


def test_even_split_gives_contiguous_slices_and_threads_equal_to_cores():
    placements = plan(range(8), prompt_services=2, token_services=2, mode="split")
    assert [p.cores for p in placements.values()] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(p.threads == 2 for p in placements.values())
    assert describe(placements, range(8)) == ("prompt-0 cores 0-1, prompt-1 cores 2-3, token-0 cores 4-5, "
                                              "token-1 cores 6-7 (2 threads each)")


def test_uneven_split_gives_the_spare_cores_to_token_services_first():
    placements = plan(range(5), prompt_services=1, token_services=1, mode="split")
    assert placements == {"prompt-0": Placement((0, 1), 2), "token-0": Placement((2, 3, 4), 3)}
    assert describe(placements, range(5)) == "prompt-0 cores 0-1 (2 threads), token-0 cores 2-4 (3 threads)"
    # more spare cores than token services: they go on to the prompt services, still at most one apart
    placements = plan(range(7), prompt_services=3, token_services=1, mode="split")
    assert {n: len(p.cores) for n, p in placements.items()} == {"prompt-0": 2, "prompt-1": 2, "prompt-2": 1,
                                                               "token-0": 2}


def test_every_core_used_once_for_any_mix():
    for cores in range(1, 13):
        for prompts in range(0, 4):
            for tokens in range(1, 4):
                if prompts + tokens > cores:
                    continue
                placements = plan(range(cores), prompts, tokens, mode="split")
                used = [c for p in placements.values() for c in p.cores]
                assert sorted(used) == list(range(cores))
                sizes = [len(p.cores) for p in placements.values()]
                assert max(sizes) - min(sizes) <= 1
                token_sizes = [len(placements[f"token-{i}"].cores) for i in range(tokens)]
                assert all(len(placements[f"prompt-{i}"].cores) <= min(token_sizes) for i in range(prompts))


def test_more_engines_than_cores_pins_nothing_and_shares_threads():
    placements = plan([0, 1], prompt_services=2, token_services=2, mode="split")
    assert placements == {name: Placement((), 1) for name in ("prompt-0", "prompt-1", "token-0", "token-1")}
    assert describe(placements, [0, 1]) == "4 engines > 2 cores: none pinned, 1 thread each"
    assert plan(range(3), prompt_services=1, token_services=3, mode="split")["token-2"] == Placement((), 1)


def test_colocated_single_token_service_gets_every_core():
    assert plan([0, 1], prompt_services=0, token_services=1, mode="split") == {"token-0": Placement((0, 1), 2)}
    assert plan(range(16), prompt_services=0, token_services=1, mode="split")["token-0"].threads == 16


def test_core_ids_need_not_start_at_zero_or_be_contiguous():
    placements = plan({7, 2, 3, 6}, prompt_services=1, token_services=1, mode="split")  # e.g. under taskset -c 2,3,6,7
    assert placements == {"prompt-0": Placement((2, 3), 2), "token-0": Placement((6, 7), 2)}
    assert describe(plan([2, 3, 6], 0, 1, mode="split"), [2, 3, 6]) == "token-0 cores 2-3,6 (3 threads each)"


def test_a_pinned_placement_runs_one_thread_per_core():
    with pytest.raises(ValueError):
        Placement((0, 1), 1)
    with pytest.raises(ValueError):
        Placement((), 0)


def test_turns_give_every_engine_every_core_unpinned():
    placements = plan([0, 1], prompt_services=1, token_services=1, mode="turns")
    assert placements == {name: Placement((), 2, turns=True) for name in ("prompt-0", "token-0")}
    assert describe(placements, [0, 1]) == "prompt-0, token-0 take turns on cores 0-1 (2 threads each)"
    assert plan([0, 1], 0, 1, mode="turns") == {"token-0": Placement((0, 1), 2)}  # alone: nobody to take turns with


def test_auto_takes_turns_on_small_hosts_and_splits_big_ones():
    assert plan([0, 1], 1, 1) == plan([0, 1], 1, 1, mode="turns")          # 1 core each: turns
    assert plan(range(4), 2, 2) == plan(range(4), 2, 2, mode="turns")      # more engines than cores: turns
    assert plan(range(7), 1, 1) == plan(range(7), 1, 1, mode="turns")      # 3 and 4 cores: turns
    assert plan(range(8), 1, 1) == plan(range(8), 1, 1, mode="split")      # 4 cores each: split
    assert plan(range(16), 2, 2) == plan(range(16), 2, 2, mode="split")
    assert plan([0, 1], 0, 1) == {"token-0": Placement((0, 1), 2)}         # colocated, one engine: every core


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'pinned' is not one of"):
        plan([0, 1], 1, 1, mode="pinned")


def test_each_stage_of_a_token_pipeline_is_an_engine():
    placements = plan([0, 1, 2, 3], prompt_services=1, token_services=1, mode="split", stages=3)
    assert {n: p.cores for n, p in placements.items()} == {
        "prompt-0": (0,), "token-0": (1,), "token-0-stage-1": (2,), "token-0-stage-2": (3,)}
    assert all(p.turns for p in plan([0, 1], 0, 1, mode="auto", stages=2).values())  # 2 engines on 2 cores
