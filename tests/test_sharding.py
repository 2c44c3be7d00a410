import numpy as np
import pytest

from flops_dist.sharding import EXAMPLE_STRIDE, assign_chunks, chunk_costs, plan_queries


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("unit", [1, 2])
def test_every_query_lands_in_exactly_one_chunk_cell(shared, unit):
    start, stop = np.array([0, 1, 0, 2]), np.array([3, 4, 1, 2])
    plan = plan_queries(start, stop, 1000, unit, shared, 4)
    cells = plan.chunks.index[plan.chunks.index >= 0]
    assert sorted(cells.tolist()) == list(range(len(plan.example)))
    assert len(plan.example) == unit * int((stop - start).sum())
    valid = plan.chunks.index >= 0
    assert np.array_equal(plan.chunks.examples[valid], plan.example[plan.chunks.index[valid]])
    assert np.array_equal(plan.chunks.seeds[valid], plan.seed[plan.chunks.index[valid]])
    if shared:  # one perturbation per chunk, and seed s_k for unit k of every example
        assert all(len(set(row)) == 1 for row in plan.chunks.seeds)
        assert set(plan.seed.tolist()) == {1000, 1001, 1002, 1003}
    else:
        assert np.array_equal(plan.seed[::unit] - 1000 - plan.example[::unit] * EXAMPLE_STRIDE,
                              np.concatenate([np.arange(a, b) for a, b in zip(start, stop)]))


def test_padding_repeats_a_real_query_so_the_chunk_stays_full():
    plan = plan_queries(np.array([0]), np.array([5]), 0, 1, False, 4)
    assert plan.chunks.examples.shape == (2, 4)
    assert plan.chunks.index[1].tolist() == [4, -1, -1, -1]
    assert plan.chunks.seeds[1].tolist() == [4] * 4


def test_assignment_covers_every_chunk_once_and_follows_speed():
    costs = np.ones(30)
    parts = assign_chunks(costs, np.array([1.0, 2.0]))
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    assert len(parts[1]) == 20 and len(parts[0]) == 10


def test_shared_chunks_cost_one_noise_generation():
    shared = plan_queries(np.zeros(4, np.int64), np.full(4, 4), 0, 1, True, 4).chunks
    independent = plan_queries(np.zeros(4, np.int64), np.full(4, 4), 0, 1, False, 4).chunks
    assert chunk_costs(shared, 2.0)[0] == 4 + 2.0
    assert chunk_costs(independent, 2.0)[0] == 4 + 4 * 2.0
