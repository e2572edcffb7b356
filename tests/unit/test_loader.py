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


# --- several datasets (--dataset_list) ---------------------------------------------------------------
from forge_dist.data.loader import MultiDatasetLoader, choose_dataset, normalized_probs  # noqa: E402


@pytest.fixture(scope="module")
def two(tmp_path_factory, splits):
    return [splits, _dataset(tmp_path_factory.mktemp("data2") / "ds2", seed=5, n=2000)]


def multi(two, b, G=1, r=0, D=1, probs=None, seed=1337):
    return MultiDatasetLoader([loader(s, b, G=G, r=r, D=D, seed=seed) for s in two], probs, names=["a", "b"])


def test_multi_draws_one_dataset_per_iteration_from_seed_and_iteration(two):
    a, b = multi(two, 4), multi(two, 4)
    order = [b.dataset_index(k) for k in (9, 3, 0)] + [b.dataset_index(k) for k in range(12)]  # any history
    picks = [a.dataset_index(k) for k in range(12)]
    assert order[3:] == picks and order[:3] == [picks[9], picks[3], picks[0]]
    assert set(picks) == {0, 1}
    assert picks != [multi(two, 4, seed=7).dataset_index(k) for k in range(12)]
    for k in range(12):  # the whole batch of iteration k comes from its dataset's own loader
        assert_same(a.get(k), loader(two[picks[k]], 4).get(k))
    assert a.next_iteration == 12


def test_multi_data_parallel_ranks_agree_on_the_dataset_and_partition_the_batch(two):
    single = multi(two, 4)
    ranks = [multi(two, 2, r=r, D=2) for r in range(2)]
    for k in range(6):
        assert {rk.dataset_index(k) for rk in ranks} == {single.dataset_index(k)}
        assert_same(cat([rk.get(k) for rk in ranks]), single.get(k))


def test_sampling_probs_weight_the_choice():
    assert np.allclose(normalized_probs(None, 4), 0.25)
    assert np.allclose(normalized_probs([1, 3], 2), [0.25, 0.75])
    p = normalized_probs([0, 2], 2)
    assert {choose_dataset(1337, k, p) for k in range(200)} == {1}
    share = np.mean([choose_dataset(1337, k, normalized_probs([1, 3], 2)) for k in range(4000)])
    assert abs(share - 0.75) < 0.03
    with pytest.raises(DataError, match="3 values for 2 datasets"):
        normalized_probs([1, 1, 1], 2)
    with pytest.raises(DataError, match="non-negative weights with a positive sum"):
        normalized_probs([-1, 2], 2)
    with pytest.raises(DataError, match="non-negative weights with a positive sum"):
        normalized_probs([0, 0], 2)


def test_multi_resume_continues_and_refuses_other_datasets_or_probs(two, tmp_path):
    first = multi(two, 3, G=2)
    for k in range(5):
        first.get(k, 0)
    state = first.state_dict()
    torch.save(state, tmp_path / "multi.pt")  # plain values only
    resumed = multi(two, 3, G=2, seed=99)
    resumed.load_state_dict(torch.load(tmp_path / "multi.pt", weights_only=True))
    assert resumed.next_iteration == 5 and resumed.seed == 1337
    full = multi(two, 3, G=2)
    for k in range(5, 9):
        assert resumed.dataset_index(k) == full.dataset_index(k)
        assert_same(resumed.get(k, 1), full.get(k, 1))
    with pytest.raises(DataError, match="dataset_sampling_probs changed"):
        multi(two, 3, G=2, probs=[1, 3]).load_state_dict(state)
    with pytest.raises(DataError, match="trained on 2 datasets"):
        MultiDatasetLoader([loader(two[0], 3, G=2)]).load_state_dict(state)
    with pytest.raises(DataError, match="dataset a of --dataset_list: .*global_batch_size=6"):
        multi(two, 2, G=2).load_state_dict(state)
    with pytest.raises(DataError, match="trained on several datasets"):
        loader(two[0], 3, G=2).load_state_dict(state)
    with pytest.raises(DataError, match="trained on one dataset"):
        multi(two, 3, G=2).load_state_dict(loader(two[0], 3, G=2).state_dict())
