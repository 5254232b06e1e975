"""Score sums and the collectives under them, on 2 and 3 ranks run as threads (tests/threaded_world.py).

The expected values are written here from the definitions: the sum over every rank and batch of `grad^T x` (squared
for `fisher`), each rank's equal flat share of it, and lockstep's stand-in batches. The torchrun tests of
tests/test_distributed.py check the same code end to end under the real engines.
"""

import pytest
import torch
from threaded_world import threaded_world

from spu_peft.distributed import all_reduce_sum, gather_shards, lockstep, rank, shard_range, world_size
from spu_peft.scoring import ScoreSums

SHAPES = {"a": (5, 7), "b": (3, 2), "untouched": (2, 3)}  # 35 and 6 entries: neither divides evenly by 3 or 2
CPU = torch.device("cpu")


def rank_batches(rank: int, num: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s `(layer, x, grad_output)` triples: a different number of tokens per batch and per rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    found = []
    for step in range(num):
        for name in ("a", "b"):
            rows, cols = SHAPES[name]
            tokens = 2 + step + rank
            found.append(
                (name, torch.randn(tokens, cols, generator=generator), torch.randn(tokens, rows, generator=generator))
            )
    return found


def expected_sums(size: int, num: int, squared: bool) -> dict[str, torch.Tensor]:
    """Σ over ranks and batches of the weight gradient grad^T x (each squared first for `fisher`), in float64."""
    total = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    for r in range(size):
        for name, x, grad in rank_batches(r, num):
            term = grad.double().t() @ x.double()
            total[name] += term.square() if squared else term
    return total


def equal_shares(numel: int, size: int) -> list[tuple[int, int]]:
    """Ranks' [start, stop) of `numel` flat entries: ceil(numel / size) each, the last ones short or empty."""
    share = (numel + size - 1) // size
    return [(min(r * share, numel), min((r + 1) * share, numel)) for r in range(size)]


def run_sums(monkeypatch, size: int, num: int, **kwargs) -> list[ScoreSums]:
    world = threaded_world(monkeypatch, size)

    def score(r: int) -> ScoreSums:
        sums = ScoreSums(SHAPES, dict.fromkeys(SHAPES, CPU), **kwargs)
        for name, x, grad in rank_batches(r, num):
            sums.add(name, x, grad)
        sums.finish()
        return sums

    return world.run(score)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("squared", [False, True])
def test_replicated_sums_are_the_total_over_every_rank_on_every_rank(monkeypatch, size, squared):
    expected = expected_sums(size, num=2, squared=squared)
    for sums in run_sums(monkeypatch, size, num=2, squared=squared, sharded=False):
        for name in SHAPES:
            assert sums.sums[name].shape == SHAPES[name]
            torch.testing.assert_close(sums.sums[name].double(), expected[name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sums.whole(name, CPU).double(), expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("squared", [False, True])
def test_sharded_sums_keep_each_ranks_equal_share_and_gather_to_the_total(monkeypatch, size, squared):
    """A sharded model's layer sees each rank's own batch gradient: summed over ranks at once, then sliced."""
    expected = expected_sums(size, num=2, squared=squared)
    found = run_sums(monkeypatch, size, num=2, squared=squared, sharded=True)
    for name in SHAPES:
        flat = expected[name].flatten()
        for r, (start, stop) in enumerate(equal_shares(flat.numel(), size)):
            assert found[r].sums[name].shape == (stop - start,)
            torch.testing.assert_close(found[r].sums[name].double(), flat[start:stop], rtol=1e-5, atol=1e-5)
    wholes = threaded_world(monkeypatch, size).run(lambda r: {name: found[r].whole(name, CPU) for name in SHAPES})
    for whole in wholes:
        for name in SHAPES:
            assert whole[name].dtype == torch.float32
            torch.testing.assert_close(whole[name].double(), expected[name], rtol=1e-5, atol=1e-5)


def test_a_stand_in_batch_adds_nothing_but_still_takes_part_in_the_sum(monkeypatch):
    """Rank 1 steps with a weight-0 stand-in batch (lockstep): the sums are rank 0's alone, on both ranks."""
    world = threaded_world(monkeypatch, 2)
    expected = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    for name, x, grad in rank_batches(0, 1):
        expected[name] += grad.double().t() @ x.double()

    def score(r: int) -> dict[str, torch.Tensor]:
        sums = ScoreSums(SHAPES, dict.fromkeys(SHAPES, CPU), squared=False, sharded=True)
        sums.weight = 1.0 if r == 0 else 0.0
        for name, x, grad in rank_batches(r, 1):
            sums.add(name, x, grad)
        sums.finish()
        return {name: sums.whole(name, CPU) for name in SHAPES}

    for whole in world.run(score):
        for name in SHAPES:
            torch.testing.assert_close(whole[name].double(), expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharded", [False, True])
def test_bfloat16_sums_are_reduced_through_float32(monkeypatch, sharded):
    """gloo cannot reduce bfloat16: the sum goes through a float32 copy and lands back in the bfloat16 sums."""
    expected = expected_sums(2, num=1, squared=False)
    found = run_sums(monkeypatch, 2, num=1, squared=False, sharded=sharded, dtype=torch.bfloat16)
    wholes = threaded_world(monkeypatch, 2).run(lambda r: {name: found[r].whole(name, CPU) for name in SHAPES})
    for r in range(2):
        for name in SHAPES:
            assert found[r].sums[name].dtype == torch.bfloat16
            torch.testing.assert_close(wholes[r][name].double(), expected[name], rtol=2e-2, atol=5e-2)


def test_layers_no_batch_reached_get_zero_sums_of_their_share(monkeypatch):
    for sharded in (False, True):
        found = run_sums(monkeypatch, 3, num=1, squared=False, sharded=sharded)
        for r, (start, stop) in enumerate(equal_shares(6, 3)):
            shape = (stop - start,) if sharded else SHAPES["untouched"]
            assert found[r].sums["untouched"].shape == shape
            assert found[r].sums["untouched"].dtype == torch.float32
            assert not found[r].sums["untouched"].any()


def test_sums_are_kept_on_the_score_device_in_the_score_dtype(monkeypatch):
    sums = ScoreSums({"a": (2, 3)}, {"a": torch.device("meta")}, squared=False, sharded=False, device="cpu")
    assert sums.devices == {"a": CPU}
    sums.add("a", torch.ones(1, 3), torch.ones(1, 2))
    sums.add("a", torch.ones(1, 3), torch.ones(1, 2))
    assert sums.sums["a"].device == CPU and torch.equal(sums.sums["a"], torch.full((2, 3), 2.0))
    half = ScoreSums({"a": (2, 3)}, {"a": CPU}, squared=True, sharded=False, dtype=torch.bfloat16)
    half.add("a", torch.full((1, 3), 2.0), torch.ones(1, 2))
    half.add("a", torch.full((1, 3), 2.0), torch.ones(1, 2))
    assert half.sums["a"].dtype == torch.bfloat16 and torch.equal(half.sums["a"].float(), torch.full((2, 3), 8.0))


def test_sums_live_on_the_score_device_not_the_layers(monkeypatch):
    """Sums kept off the layers' device (as `score_device="cpu"` keeps them off a GPU), shown with the meta device,
    which every machine has: the first sum, the later ones, a layer no batch reached, and the whole matrix."""
    meta = torch.device("meta")
    sums = ScoreSums({"a": (2, 3), "b": (1, 2)}, {"a": CPU, "b": CPU}, squared=False, sharded=False, device="meta")
    assert sums.devices == {"a": meta, "b": meta}
    sums.add("a", torch.ones(1, 3), torch.ones(1, 2))
    sums.add("a", torch.ones(1, 3), torch.ones(1, 2))
    sums.finish()
    assert {sums.sums["a"].device, sums.sums["b"].device} == {meta}
    assert sums.sums["a"].shape == (2, 3) and sums.sums["b"].shape == (1, 2)
    on_cpu = ScoreSums({"a": (2, 3)}, {"a": CPU}, squared=False, sharded=False)
    on_cpu.add("a", torch.ones(1, 3), torch.ones(1, 2))
    assert on_cpu.whole("a", meta).device == meta and on_cpu.whole("a", CPU).device == CPU


@pytest.mark.parametrize(("numel", "size"), [(35, 2), (35, 3), (6, 3), (2, 3), (0, 2)])
def test_shard_ranges_are_equal_contiguous_shares_that_cover_every_entry(monkeypatch, numel, size):
    ranges = threaded_world(monkeypatch, size).run(lambda r: (rank(), world_size(), shard_range(numel)))
    assert [r for r, _, _ in ranges] == list(range(size)) and {s for _, s, _ in ranges} == {size}
    assert [found for _, _, found in ranges] == equal_shares(numel, size)


@pytest.mark.parametrize("size", [2, 3])
def test_gather_shards_rebuilds_the_whole_flat_tensor_in_rank_order(monkeypatch, size):
    whole = torch.arange(11, dtype=torch.float64)
    shares = equal_shares(11, size)
    found = threaded_world(monkeypatch, size).run(lambda r: gather_shards(whole[slice(*shares[r])].clone(), 11))
    for gathered in found:
        assert gathered.dtype == torch.float64 and torch.equal(gathered, whole)


def test_all_reduce_sum_sums_in_place_and_keeps_the_dtype(monkeypatch):
    def reduce(r: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        wide = torch.tensor([1.0, 2.0]) * (r + 1)
        half = torch.tensor([0.5, 1.5], dtype=torch.bfloat16) * (r + 1)
        return all_reduce_sum(wide), half, all_reduce_sum(half) is half

    for wide, half, same in threaded_world(monkeypatch, 3).run(reduce):
        assert torch.equal(wide, torch.tensor([6.0, 12.0]))
        assert half.dtype == torch.bfloat16 and torch.equal(half, torch.tensor([3.0, 9.0], dtype=torch.bfloat16))
        assert same


def steps_of(monkeypatch, counts: tuple[int, ...]) -> list[list[tuple[int, bool]]]:
    """Each rank's `(batch, real)` steps when rank r holds counts[r] batches numbered 10 * r + i."""
    batches = {r: [{"x": torch.tensor([10 * r + i])} for i in range(n)] for r, n in enumerate(counts)}

    def steps(r: int) -> list[tuple[int, bool]]:
        return [(int(batch["x"]), real) for batch, real in lockstep(batches[r], sharded=True, device=CPU)]

    return threaded_world(monkeypatch, len(counts)).run(steps)


def test_lockstep_steps_every_rank_as_often_as_the_busiest_repeating_its_last_batch(monkeypatch):
    assert steps_of(monkeypatch, (3, 1)) == [[(0, True), (1, True), (2, True)], [(10, True), (10, False), (10, False)]]
    assert steps_of(monkeypatch, (1, 2)) == [[(0, True), (0, False)], [(10, True), (11, True)]]


def test_lockstep_sends_a_batch_while_some_rank_has_never_had_one(monkeypatch):
    """Rank 2 has no batch: at each step the first holder's batch is sent, and every rank short of one uses it."""
    assert steps_of(monkeypatch, (3, 1, 0)) == [
        [(0, True), (1, True), (2, True)],
        [(10, True), (1, False), (2, False)],
        [(0, False), (1, False), (2, False)],
    ]
    assert steps_of(monkeypatch, (0, 2)) == [[(10, False), (11, False)], [(10, True), (11, True)]]


def test_lockstep_ends_at_once_when_no_rank_has_a_batch(monkeypatch):
    assert threaded_world(monkeypatch, 2).run(lambda r: list(lockstep([], sharded=True, device=CPU))) == [[], []]


def test_replicated_models_need_no_lockstep(monkeypatch):
    """Each rank scores just its own batches, and no collective runs."""
    world = threaded_world(monkeypatch, 2)
    found = world.run(lambda r: [(b, real) for b, real in lockstep(range(r + 1), sharded=False, device=CPU)])
    assert found == [[(0, True)], [(0, True), (1, True)]]
    assert world.collectives == 0
