import torch
from torch import nn

from hsl_lightning.federation.strategies import get_strategy
from hsl_lightning.federation.sync import StatePacker


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def states(n=3):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        m = Tiny()
        m.bn.running_mean.normal_()
        m.bn.num_batches_tracked.fill_(10 * (i + 1))
        out.append(m.state_dict())
    return out


def merge(strategy, sts, n_train):
    packer = StatePacker(sts[0], strategy.shared_keys(Tiny()))
    total = torch.zeros(packer.numel + 1, dtype=torch.float64)
    for s, n in zip(sts, n_train):
        w = strategy.weight(n)
        total[:-1] += w * packer.pack(s)
        total[-1] += w
    return packer.unpack(strategy.combine(None, total[:-1], None, float(total[-1])))


def test_hsl_sync_is_the_unweighted_mean_of_every_entry():
    sts = states()
    merged = merge(get_strategy("hsl"), sts, n_train=[100, 10, 1])
    for key in sts[0]:
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(merged[key], sum(s[key] for s in sts) / 3, atol=1e-7), key
    assert set(merged) == set(sts[0])  # nothing stays local


def test_integer_buffers_take_the_rounded_mean():
    merged = merge(get_strategy("hsl"), states(), n_train=[1, 1, 1])
    assert merged["bn.num_batches_tracked"].dtype == torch.long
    assert int(merged["bn.num_batches_tracked"]) == 20  # mean of 10, 20, 30


def test_fedavg_weights_by_training_set_size():
    sts = states()
    merged = merge(get_strategy("fedavg"), sts, n_train=[6, 3, 1])
    expected = (6 * sts[0]["lin.weight"] + 3 * sts[1]["lin.weight"] + sts[2]["lin.weight"]) / 10
    assert torch.allclose(merged["lin.weight"], expected, atol=1e-7)


def test_local_and_central_share_nothing():
    for name in ("local", "central"):
        assert get_strategy(name).shared_keys(Tiny()) == []
    assert get_strategy("central").plan(3) == [(0, 1, 2)]
    assert get_strategy("local").plan(3) == [(0,), (1,), (2,)]


def test_packer_counts_native_bytes_and_round_trips():
    st = states(1)[0]
    packer = StatePacker(st, list(st))
    assert packer.nbytes == sum(v.numel() * v.element_size() for v in st.values())
    back = packer.unpack(packer.pack(st))
    assert all(torch.equal(back[k], st[k]) for k in st)


def test_accumulate_and_the_unpack_cache_equal_the_plain_operations():
    a, b, _ = states()
    packer = StatePacker(a, list(a))
    acc = torch.zeros(packer.numel, dtype=torch.float64)
    packer.accumulate(acc, a, 2.0)
    packer.accumulate(acc, b, 3.0)
    assert torch.allclose(acc, 2.0 * packer.pack(a) + 3.0 * packer.pack(b), rtol=0, atol=1e-12)
    merged = packer.representable(acc / 5.0)
    first = packer.unpack(merged)  # from the cache
    first["lin.weight"] = torch.zeros(2, 3)  # callers may edit their dict ...
    again = packer.unpack(merged)  # ... without touching the cached one
    fresh = StatePacker(a, list(a)).unpack(merged.clone())
    assert set(again) == set(fresh) and all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert again["bn.num_batches_tracked"].dtype == torch.long
