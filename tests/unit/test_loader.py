"""BatchLoader: batches depend on (seed, iteration, global batch) alone; DP/GAS slicing; resume."""
import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from forge_dist.data import BatchLoader, DataError, ExternalTokenizer, TokenDataset, write_dataset  # noqa: E402

T = 8


def _dataset(folder, seed=0, n=3000):
    ids = np.random.default_rng(seed).integers(0, 500, size=n)
    write_dataset(folder, ExternalTokenizer("test", 500), {"train": ids[: n - 600], "val": ids[n - 600:]})
    return {split: TokenDataset.open(folder, split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("data") / "ds")


def loader(splits, b, G=1, r=0, D=1, seed=1337):
    return BatchLoader(splits, T, b, grad_accum_steps=G, dp_rank=r, dp_size=D, seed=seed)


def cat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rows_are_shifted_windows_of_the_data(splits):
    ld = loader(splits, 4)
    x, y = ld.get(0)
    tokens = splits["train"].tokens
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    for row, start in zip(range(4), ld.iteration_offsets(0)):
        assert 0 <= start < len(tokens) - T
        assert x[row].tolist() == tokens[start:start + T].tolist()
        assert y[row].tolist() == tokens[start + 1:start + 1 + T].tolist()


def test_batches_depend_only_on_seed_and_iteration(splits):
    a, b = loader(splits, 4), loader(splits, 4)
    later_first = [b.get(k) for k in (5, 2, 0)]  # any order, any history
    assert_same(cat(later_first), cat([a.get(k) for k in (5, 2, 0)]))
    assert not torch.equal(a.get(1)[0], a.get(2)[0])
    assert not torch.equal(a.get(1)[0], loader(splits, 4, seed=7).get(1)[0])


@pytest.mark.parametrize("D,b", [(2, 3), (4, 2)])
def test_data_parallel_ranks_partition_the_single_process_batch(splits, D, b):
    single = loader(splits, D * b)
    ranks = [loader(splits, b, r=r, D=D) for r in range(D)]
    for k in range(4):
        assert_same(cat([rk.get(k) for rk in ranks]), single.get(k))


def test_gradient_accumulation_order_matches_single_process(splits):
    b, G, D = 2, 3, 2
    ranks = [loader(splits, b, G=G, r=r, D=D) for r in range(D)]
    single_gas = loader(splits, b, G=G * D)
    single_big = loader(splits, b * G * D)
    for k in (0, 3):
        # micro-step m of rank r == micro-step r*G + m of one process with G' = D*G
        for r in range(D):
            for m in range(G):
                assert_same(ranks[r].get(k, m), single_gas.get(k, r * G + m))
        every = cat([ranks[r].get(k, m) for r in range(D) for m in range(G)])
        assert_same(every, single_big.get(k))


def test_resume_from_state_dict_continues_the_same_stream(splits, tmp_path):
    full = loader(splits, 3, G=2)
    seen = [full.get(k, m) for k in range(8) for m in range(2)]
    first = loader(splits, 3, G=2)
    for k in range(5):
        for m in range(2):
            first.get(k, m)
    state = first.state_dict()
    assert state["next_iteration"] == 5 and state["split_tokens"] == {"train": 2400, "val": 600}
    torch.save(state, tmp_path / "loader.pt")  # plain values: loads with weights_only=True
    resumed = loader(splits, 3, G=2, seed=99)  # the checkpoint's seed wins
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    assert resumed.next_iteration == 5 and resumed.seed == 1337
    again = [resumed.get(k, m) for k in range(resumed.next_iteration, 8) for m in range(2)]
    assert_same(cat(again), cat(seen[10:]))


def test_resume_refuses_changed_data_or_batch(splits, tmp_path):
    state = loader(splits, 4).state_dict()
    changed = _dataset(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="dataset changed since the checkpoint.*--init_from prev_run"):
        loader(changed, 4).load_state_dict(state)
    with pytest.raises(DataError, match="global_batch_size=4.*unchanged"):
        loader(splits, 2).load_state_dict(state)
    elastic = loader(splits, 2, r=1, D=2)  # same global batch on a different DP size resumes exactly
    elastic.load_state_dict(state)
    assert_same(elastic.get(3), (loader(splits, 4).get(3)[0][2:], loader(splits, 4).get(3)[1][2:]))
    relaxed = loader(splits, 2)
    relaxed.load_state_dict(state, strict=False)
    assert relaxed.seed == 1337


def test_eval_stream_is_separate_and_reproducible(splits):
    a, b = loader(splits, 4), loader(splits, 4)
    for k in range(3):
        b.get(k)  # training draws must not move the eval stream, nor the other way round
    ev = a.get_eval("val", 2, 1)
    assert_same(ev, b.get_eval("val", 2, 1))
    assert_same(a.get(1), b.get(1))
    assert not torch.equal(ev[0], a.get_eval("val", 3, 1)[0])
    assert not torch.equal(a.get_eval("train", 0, 0)[0], a.get(0)[0])  # eval on train != train batch 0
    val = splits["val"].tokens
    assert any(ev[0][0].tolist() == val[i:i + T].tolist() for i in range(len(val) - T))
    ranks = [loader(splits, 2, r=r, D=2) for r in range(2)]
    assert_same(cat([rk.get_eval("val", 0, 0) for rk in ranks]), a.get_eval("val", 0, 0))


def test_bad_arguments_are_refused(splits, tmp_path):
    with pytest.raises(DataError, match="fewer than block_size\\+1"):
        BatchLoader(splits, 600, 2)
    with pytest.raises(DataError, match="dp_rank 2 is outside"):
        loader(splits, 2, r=2, D=2)
    with pytest.raises(DataError, match="micro_step 2 is outside"):
        loader(splits, 2, G=2).get(0, 2)
    with pytest.raises(DataError, match="no 'train' split"):
        BatchLoader({"val": splits["val"]}, T, 2)
    with pytest.raises(DataError, match="cannot evaluate on split 'test'"):
        loader(splits, 2).get_eval("test", 0, 0)
    from_dir = BatchLoader.from_dir(splits["train"].path, T, 2)
    assert set(from_dir.splits) == {"train", "val"}
    assert_same(from_dir.get(4), loader(splits, 2).get(4))
