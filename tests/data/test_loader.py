import json
import pickle

import numpy as np
import pytest
import torch

from lmtrain.data.loader import Blocks, MixtureLoader, TrainLoader, eval_batches, shift
from lmtrain.errors import DataError


def test_shift_pairs_each_token_with_the_next():
    windows = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    x, y = shift(windows)
    assert x.tolist() == [[10, 11, 12], [20, 21, 22]]
    assert y.tolist() == [[11, 12, 13], [21, 22, 23]]


def test_batches_are_windows_of_the_token_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = TrainLoader([tokens], block_size=8, batch_size=4, seed=0)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert row_x[0] % 8 == 0  # windows start on block boundaries
        assert row_x == list(range(row_x[0], row_x[0] + 8))
        assert row_y == [v + 1 for v in row_x]


def test_an_epoch_visits_every_block_once_in_a_seeded_order():
    tokens = np.arange(8 * 40 + 1, dtype=np.uint16)
    loader = TrainLoader([tokens], block_size=8, batch_size=5, seed=3)
    it = iter(loader)
    firsts = [x[:, 0].tolist() for x, _ in (next(it) for _ in range(loader.batches_per_epoch))]
    seen = sorted(v for batch in firsts for v in batch)
    assert seen == list(range(0, 8 * 40, 8))
    visit_order = [v for batch in firsts for v in batch]
    assert visit_order != seen  # shuffled, not read front to back
    second_epoch = next(it)[0][:, 0].tolist()
    assert loader.state.epoch == 1 and second_epoch != firsts[0]
    same_seed = TrainLoader([tokens], block_size=8, batch_size=5, seed=3)
    assert next(iter(same_seed))[0][:, 0].tolist() == firsts[0]


def test_loader_resumes_exactly_from_its_state():
    tokens = np.arange(4000, dtype=np.uint16)
    reference = TrainLoader([tokens], block_size=16, batch_size=4, seed=1)
    it = iter(reference)
    expected = [next(it)[0] for _ in range(130)]  # crosses into a second epoch (62 batches per epoch)
    first = TrainLoader([tokens], block_size=16, batch_size=4, seed=1)
    it = iter(first)
    for _ in range(70):
        next(it)
    resumed = TrainLoader([tokens], block_size=16, batch_size=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for i in range(70, 130):
        assert torch.equal(next(it)[0], expected[i])


def test_worker_processes_deliver_the_same_batches():
    tokens = np.arange(3000, dtype=np.uint16)
    plain = iter(TrainLoader([tokens], block_size=16, batch_size=4, seed=2))
    workers = iter(TrainLoader([tokens], block_size=16, batch_size=4, seed=2, num_workers=2))
    for _ in range(5):
        assert torch.equal(next(plain)[0], next(workers)[0])


def test_eval_batches_are_fixed_and_within_the_split():
    tokens = np.arange(2000, dtype=np.uint16)
    a, b = eval_batches([tokens], 16, 4, 3), eval_batches([tokens], 16, 4, 3)
    assert len(a) == 3
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(3))


def test_too_few_tokens_for_one_window_is_a_clear_error():
    with pytest.raises(DataError, match="the validation split has 20 tokens, fewer than one window of "
                                       r"model.block_size\+1=17"):
        Blocks([np.arange(10), np.arange(10)], 16, "validation")


def test_windows_never_cross_shards_and_cover_each():
    shards = [np.arange(0, 35, dtype=np.uint16), np.arange(100, 121, dtype=np.uint16)]  # 4 blocks, then 2
    blocks = Blocks(shards, 8, "train")
    assert len(blocks) == 6
    firsts = blocks.windows(np.arange(6))[:, 0].tolist()
    assert firsts == [0, 8, 16, 24, 100, 108]
    assert blocks.windows(np.array([5]))[0].tolist() == list(range(108, 117))


def test_memory_mapped_shards_reach_workers_by_reference(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100_000, dtype=np.uint16).tofile(path)
    shards = [np.memmap(path, dtype=np.uint16, mode="r", offset=2 * 1000, shape=(50_000,))]
    blocks = Blocks(shards, 16, "train")
    sent = pickle.dumps(blocks)
    assert len(sent) < 2000  # not the 100 KB of tokens
    assert torch.equal(pickle.loads(sent).windows(np.arange(len(blocks))), blocks.windows(np.arange(len(blocks))))


def mixture(seed=0, **kw) -> MixtureLoader:
    code, prose = np.arange(0, 8 * 50 + 1, dtype=np.uint16), np.arange(1000, 1000 + 8 * 200 + 1, dtype=np.uint16)
    return MixtureLoader({"code": [code], "prose": [prose]}, {"code": 0.7, "prose": 0.3}, block_size=8,
                         batch_size=10, seed=seed, **kw)


def test_a_mixture_draws_sources_by_weight_and_walks_each_in_epochs():
    loader = mixture()
    it = iter(loader)
    rows = torch.cat([next(it)[0] for _ in range(40)])  # 400 sequences
    from_code = rows[:, 0] < 1000
    assert 0.62 < from_code.float().mean().item() < 0.78
    code_starts = rows[from_code, 0].tolist()
    assert sorted(code_starts[:50]) == list(range(0, 400, 8))  # the small source: every block once, then again
    assert loader.tokens_drawn() == {"code": 8 * len(code_starts), "prose": 8 * (400 - len(code_starts))}
    assert loader.batches_per_epoch == 25 and loader.state.epoch == 1 and loader.state.batch == 15
    assert [r[0] for r in loader.summary_rows()] == ["tokens from code", "tokens from prose"]
    other_seed = torch.cat([b[0] for b, _ in zip(mixture(seed=1), range(40), strict=False)])
    assert not torch.equal(other_seed, rows)


def test_a_mixture_resumes_exactly_from_its_small_state():
    reference = iter(mixture())
    expected = [next(reference)[0] for _ in range(60)]
    first = mixture()
    it = iter(first)
    for _ in range(33):
        next(it)
    state = first.state_dict()
    assert state["batch"] == 33 and sum(state["drawn"].values()) == 330
    resumed = mixture()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it = iter(resumed)
    for i in range(33, 60):
        assert torch.equal(next(it)[0], expected[i])


def test_a_mixture_with_workers_delivers_the_same_batches():
    plain, workers = iter(mixture()), iter(mixture(num_workers=2))
    for _ in range(5):
        assert torch.equal(next(plain)[0], next(workers)[0])
