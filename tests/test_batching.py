"""Tests of vaekit.batching: coverage, reproducibility, resume and DDP sharding."""

import numpy as np
import pytest
import torch

import vaekit.batching
from vaekit.batching import BatchIterator, bernoulli_draw, block_steps, fits_on_device, mix_seed


@pytest.fixture(params=["one block an epoch", "blocks of 2 steps"])
def blocks(request, monkeypatch):
    """Run a test with the default block size (every epoch here fits one block) and with
    blocks of 2 steps for the tests' data (a step of 12 or 24 elements), so that block
    boundaries, a short last block and resumes inside a block are all exercised."""
    if request.param == "blocks of 2 steps":
        monkeypatch.setattr(vaekit.batching, "BLOCK_ELEMENTS", 50)
    return request.param


def ids(n, event=(1,)):
    """Data whose first feature is the example index, to track which examples a batch holds."""
    return torch.arange(n, dtype=torch.float32).reshape(n, *([1] * len(event))).expand(n, *event).contiguous()


@pytest.mark.parametrize("drop_last, n_batches, last", [(False, 4, 2), (True, 3, 5)])
def test_iterator_covers_each_example_once(drop_last, n_batches, last):
    it = BatchIterator(ids(17, (2, 3)), 5, drop_last=drop_last, seed=4)
    for epoch in range(2):
        batches = list(it)
        assert len(batches) == len(it) == n_batches and batches[-1].shape == (last, 2, 3)
        seen = torch.cat(batches)[:, 0, 0].long()
        assert len(seen.unique()) == len(seen) == (15 if drop_last else 17)
        assert it.epoch == epoch + 1 and it.position == 0
    ordered = torch.cat(list(BatchIterator(ids(17), 5, shuffle=False)))[:, 0]
    assert torch.equal(ordered, torch.arange(17.0))


def test_iterator_same_seed_same_batches():
    x = torch.rand(23, 4, generator=torch.Generator().manual_seed(0))
    runs = [[b for b in BatchIterator(x, 4, seed=s, dynamic_binarize=True)] for s in (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    it = BatchIterator(ids(23), 23)
    e0, e1 = next(iter(it)), next(iter(it))
    assert not torch.equal(e0, e1)  # a fresh permutation each epoch


@pytest.mark.parametrize("stop", [0, 3, 6, 7, 12])
def test_iterator_resumes_mid_epoch(stop, blocks):
    x = torch.rand(26, 3, generator=torch.Generator().manual_seed(1))

    def stream(it, epochs):
        return [b.clone() for _ in range(epochs) for b in it]

    full = stream(BatchIterator(x, 4, seed=3, dynamic_binarize=True), 2)  # 7 batches per epoch
    it = BatchIterator(x, 4, seed=3, dynamic_binarize=True)
    head, gen = [], iter(it)
    while len(head) < stop:  # stop in the middle of an epoch, or right after its last batch
        try:
            head.append(next(gen).clone())
        except StopIteration:
            gen = iter(it)
    state = it.state_dict()
    resumed = BatchIterator(x, 4, seed=0, dynamic_binarize=True)
    resumed.load_state_dict(state)
    assert resumed.seed == 3
    tail = []
    while resumed.epoch < 2:  # the training loop's "for epoch in range(start, 2)"
        tail += [b.clone() for b in resumed]
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_iterator_resumes_every_rank_at_every_position(world, shuffle, blocks):
    """A fresh iterator given the state taken anywhere in 2 epochs (after any batch,
    position == len, the next epoch's 0) goes on with the same batches and draws (to the
    end of a third epoch: a state at position == len goes on with the next one)."""
    x = torch.rand(41, 2, generator=torch.Generator().manual_seed(5))

    def make(rank, seed=6):
        return BatchIterator(x, 3, shuffle=shuffle, dynamic_binarize=True, seed=seed, rank=rank, world_size=world)

    for rank in range(world):
        it, full, states = make(rank), [], [(0, make(rank).state_dict())]
        for epoch in range(3):  # states from the first 2 epochs; the third is where they go on
            for b in it:
                full.append(b.clone())
                if epoch < 2:
                    states.append((len(full), it.state_dict()))
            if epoch < 2:
                states.append((len(full), it.state_dict()))  # the epoch done: (epoch + 1, 0)
        assert {(s["epoch"], s["position"]) for _, s in states} >= {(0, len(it)), (1, 0), (1, len(it)), (2, 0)}
        for done, state in states:
            resumed = make(rank, seed=0)
            resumed.load_state_dict(state)
            tail = []
            while resumed.epoch < 3:
                tail += [b.clone() for b in resumed]
            assert len(tail) == len(full) - done, (rank, state)
            assert all(torch.equal(a, b) for a, b in zip(tail, full[done:])), (rank, state)


@pytest.mark.parametrize("n, b, world", [(37, 4, 1), (37, 4, 2), (29, 3, 2), (37, 5, 3), (101, 10, 3)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_iterator_order_follows_the_documented_rule(n, b, world, drop_last, blocks):
    """Batches against the rule written out here, not against ``permutation``: the order
    of epoch e is randperm(n) from torch.Generator().manual_seed(mix_seed(seed, e)),
    combined batch j is its [j*W*b, (j+1)*W*b) and rank r takes part r of its W-way split."""
    c = world * b
    ranks = [BatchIterator(ids(n), b, drop_last=drop_last, seed=11, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(11, epoch))).float()
        expected = [perm[j * c:(j + 1) * c] for j in range(n // c if drop_last else -(-n // c))]
        for r, it in enumerate(ranks):
            got = [batch[:, 0] for batch in it]
            assert len(got) == len(expected) and it.epoch == epoch + 1
            assert all(torch.equal(g, e.tensor_split(world)[r]) for g, e in zip(got, expected)), (epoch, r)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dynamic", [False, True])
def test_iterator_with_the_data_in_host_memory_gives_the_same_batches(world, dynamic, blocks):
    """The host-memory path (data left where they are, each block gathered there and
    copied to the device) on a CPU: "cpu:0" is not the data's "cpu", so
    keep_on_device=False leaves them out. The batches and draws are the on-device ones."""
    x = torch.rand(53, 1, 2, 3, generator=torch.Generator().manual_seed(3))

    def make(rank, **kwargs):
        return BatchIterator(x, 4, dynamic_binarize=dynamic, seed=2, rank=rank, world_size=world, **kwargs)

    for rank in range(world):
        on_device, on_host = make(rank), make(rank, device="cpu:0", keep_on_device=False)
        assert on_device.on_device and not on_host.on_device and on_host.x is x
        full = []
        for epoch in range(2):
            a, b = list(on_device), list(on_host)
            assert len(a) == len(b) == len(on_device) and all(torch.equal(p, q) for p, q in zip(a, b)), (rank, epoch)
            full += a
        head = make(rank, device="cpu:0", keep_on_device=False)  # stopped mid-epoch, then resumed
        gen = iter(head)
        stream = [next(gen).clone() for _ in range(len(head) // 2)]
        resumed = make(rank, device="cpu:0", keep_on_device=False)
        resumed.load_state_dict(head.state_dict())
        while resumed.epoch < 2:
            stream += list(resumed)
        assert len(stream) == len(full) and all(torch.equal(p, q) for p, q in zip(stream, full)), rank


def test_fit_with_data_in_host_memory_on_a_cpu_trains_the_same_model_bit_for_bit(monkeypatch, tmp_path):
    """fit on "cpu:0" (patched in: the config takes "cpu") with the data left on the host
    ("cpu") gives the weights and metrics, bit for bit, of a run with the data on its device."""
    import vaekit.wiring
    from vaekit.cli import build_config
    from vaekit.io import load_checkpoint
    from vaekit.train import fit

    made = []

    class Iterator(BatchIterator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(vaekit.wiring, "BatchIterator", Iterator)

    def run(name):
        config = build_config(overrides={"train.epochs": 2, "train.progress": False, "model.hidden": (16,),
                                         "model.latent_dim": 2, "train.num_threads": 1, "data.binarize": "dynamic"})
        return fit(config, tmp_path / name)

    a = run("on-device")
    monkeypatch.setattr(vaekit.wiring, "resolve_device", lambda *args, **kwargs: torch.device("cpu", 0))
    monkeypatch.setattr(vaekit.batching, "fits_on_device", lambda *args: False)
    b = run("on-host")
    assert made[0].on_device and not made[1].on_device and made[1].device == torch.device("cpu", 0)
    wa, wb = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("on-device", "on-host"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.history] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in b.history]


@pytest.mark.parametrize("n, drop_last, dynamic", [(29, False, False), (29, True, True), (36, False, True)])
def test_iterator_ddp_shards_concatenate_to_single_process_batches(n, drop_last, dynamic, blocks):
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(2)) if dynamic else ids(n, (2,))
    world, b = 3, 4
    single = BatchIterator(x, world * b, drop_last=drop_last, dynamic_binarize=dynamic, seed=9)
    ranks = [BatchIterator(x, b, drop_last=drop_last, dynamic_binarize=dynamic, seed=9, rank=r,
                           world_size=world) for r in range(world)]
    for epoch in range(2):
        ref = list(single)
        shards = [list(it) for it in ranks]
        assert all(len(s) == len(ref) == len(it) for s, it in zip(shards, ranks))
        for j, batch in enumerate(ref):
            assert torch.equal(torch.cat([s[j] for s in shards]), batch)
    for r in range(world):  # full batches are exactly b per rank
        assert shards[r][0].shape[0] == b


def test_iterator_dynamic_binarization_mean_matches_grey_levels():
    x = torch.tensor([[0.1, 0.5, 0.8]]).expand(50, 3).contiguous()
    it = BatchIterator(x, 10, dynamic_binarize=True, seed=5)
    draws = torch.cat([b for _ in range(20) for b in it])  # 1000 draws per level
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    se = (x[0] * (1 - x[0]) / len(draws)).sqrt()
    assert ((draws.mean(0) - x[0]).abs() < 5 * se).all()


@pytest.mark.parametrize("source", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bernoulli_draw_frequencies_and_endpoints(dtype, source):
    levels = torch.tensor([0.0, 1 / 255, 0.1, 0.5, 0.9, 254 / 255, 1.0], dtype=dtype)
    n = 40000
    gen = torch.Generator().manual_seed(0) if source == "torch" else np.random.Generator(np.random.PCG64(0))
    draws = bernoulli_draw(levels.expand(n, len(levels)), gen)
    assert draws.dtype == dtype and set(draws.unique().tolist()) == {0.0, 1.0}
    p = levels.double()
    freq = draws.double().mean(0)
    assert freq[0] == 0 and freq[-1] == 1  # exact where the level is 0 or 1
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)
    # Against torch's own Bernoulli sampler, with the same number of draws.
    ref = torch.bernoulli(p.expand(n, len(levels)), generator=torch.Generator().manual_seed(1)).mean(0)
    assert ((freq - ref).abs() <= 5 * (2 ** 0.5) * se + 1e-12).all()


@pytest.mark.parametrize("block_elements, k", [(1 << 24, 32), (40, 2), (18, 1), (5, 1)])
def test_iterator_binarizes_each_block_with_its_own_stream(monkeypatch, block_elements, k):
    monkeypatch.setattr(vaekit.batching, "BLOCK_ELEMENTS", block_elements)
    x = torch.rand(20, 3, generator=torch.Generator().manual_seed(2))
    it = BatchIterator(x, 6, dynamic_binarize=True, seed=4)  # 4 batches: 6, 6, 6, 2
    assert it.steps_per_block == k == block_steps(18)
    perm = it.permutation(0)
    batches = list(it)
    for i in range(-(-4 // k)):
        g = np.random.Generator(np.random.PCG64(mix_seed(4, 0, i)))  # on a CPU; torch's on a GPU
        block = bernoulli_draw(x[perm[i * k * 6:(i + 1) * k * 6]], g)
        assert torch.equal(torch.cat(batches[i * k:(i + 1) * k]), block)


def test_block_steps():
    assert block_steps(128 * 784) == 32 and block_steps(1) == 32
    assert block_steps(512 * 3 * 64 * 64) == 2 and block_steps(1 << 30) == 1 and block_steps(0) == 32


def test_iterator_argument_errors():
    x = torch.rand(10, 2)
    for kwargs, error, field in [
        (dict(batch_size=0), ValueError, "batch_size"), (dict(batch_size=2.0), TypeError, "batch_size"),
        (dict(rank=2, world_size=2), ValueError, "rank"), (dict(world_size=0), ValueError, "world_size"),
        (dict(batch_size=11, drop_last=True), ValueError, "drop_last"),
        (dict(batch_size=3, world_size=3), ValueError, "world_size"),  # last combined batch of 1 < 3 ranks
    ]:
        with pytest.raises(error, match=field):
            BatchIterator(x, **{"batch_size": 2, **kwargs})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BatchIterator(x * 3, 2, dynamic_binarize=True)
    it = BatchIterator(x, 2)
    with pytest.raises(ValueError, match="position"):
        it.load_state_dict({"epoch": 0, "position": 6, "seed": 0})
    with pytest.raises(ValueError, match="keys"):
        it.load_state_dict({"epoch": 0})
    it.set_epoch(3)
    assert it.state_dict() == {"epoch": 3, "position": 0, "seed": 0}
    assert torch.equal(next(iter(it)), x[it.permutation(3)[:2]])


@pytest.mark.parametrize("key", ["epoch", "position", "seed"])
@pytest.mark.parametrize("value, error, said", [
    ("1", TypeError, "an int, got str"), (1.0, TypeError, "an int, got float"), (True, TypeError, "an int, got bool"),
    (None, TypeError, "an int, got NoneType"), (-1, ValueError, "an int >= 0, got -1"),
])
def test_iterator_refuses_a_state_with_a_bad_value(key, value, error, said):
    it = BatchIterator(torch.rand(10, 2), 2)
    state = {"epoch": 1, "position": 2, "seed": 3}
    with pytest.raises(error, match=rf"state\['{key}'\] must be {said}$"):
        it.load_state_dict({**state, key: value})
    assert it.state_dict() == {"epoch": 0, "position": 0, "seed": 0}  # nothing taken from it


def test_data_already_on_the_gpu_fit_there_however_the_device_is_named(monkeypatch):
    """Tensors on the GPU say "cuda:0"; a device given as "cuda" (as fit resolves it) is
    the same one. They compared unequal, and data already there were weighed against the
    memory they themselves take."""

    class OnGPU:  # what fits_on_device reads of a tensor, as a CUDA tensor would give it
        device = torch.device("cuda", 1)

        def numel(self):
            return 10**9

        def element_size(self):
            return 4

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 8_000_000))  # nothing free
    assert fits_on_device(OnGPU(), "cuda") and fits_on_device(OnGPU(), torch.device("cuda:1"))
    assert not fits_on_device(OnGPU(), "cuda:0")  # another GPU: weighed against its free memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_iterator_on_cuda_is_reproducible_and_resumable():
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    full = [b.clone() for b in BatchIterator(x, 8, seed=2, dynamic_binarize=True, device="cuda")]
    assert all(b.device.type == "cuda" for b in full)
    it = BatchIterator(x, 8, seed=2, dynamic_binarize=True, device="cuda")
    gen = iter(it)
    head = [next(gen).clone() for _ in range(3)]
    resumed = BatchIterator(x, 8, seed=2, dynamic_binarize=True, device="cuda")
    resumed.load_state_dict(it.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(head + list(resumed), full))
    assert set(torch.cat(full).unique().tolist()) == {0.0, 1.0}


def test_fits_on_device_keeps_data_on_a_gpu_only_while_it_is_small(monkeypatch):
    x = torch.zeros(1000, 250)  # 1,000,000 bytes
    assert fits_on_device(x, "cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2_000_000, 8_000_000))
    assert fits_on_device(x, torch.device("cuda"))  # half of 2 MB free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_999_999, 8_000_000))
    assert not fits_on_device(x, torch.device("cuda"))
    monkeypatch.setattr(vaekit.batching, "DEVICE_DATA_FRACTION", 0.9)
    assert fits_on_device(x, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dynamic", [False, True])
def test_data_too_big_for_the_gpu_stay_on_the_host_and_give_the_same_batches(monkeypatch, dynamic):
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    on_gpu = BatchIterator(x, 8, seed=2, dynamic_binarize=dynamic, device="cuda")
    monkeypatch.setattr(vaekit.batching, "DEVICE_DATA_FRACTION", 0.0)
    on_host = BatchIterator(x, 8, seed=2, dynamic_binarize=dynamic, device="cuda")
    assert on_gpu.on_device and not on_host.on_device and on_host.x.device.type == "cpu"
    a, b = list(on_gpu), list(on_host)
    assert all(p.device.type == "cuda" and torch.equal(p, q) for p, q in zip(a, b)) and len(a) == len(b) == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_with_data_left_on_the_host_trains_the_same_model(monkeypatch, tmp_path):
    from vaekit.cli import build_config
    from vaekit.io import load_checkpoint
    from vaekit.train import fit

    def run(name):
        config = build_config(overrides={"train.epochs": 2, "train.progress": False, "model.hidden": (32,),
                                         "model.latent_dim": 3, "train.device": "cuda"})
        return fit(config, tmp_path / name)

    a = run("on-gpu")
    monkeypatch.setattr(vaekit.batching, "DEVICE_DATA_FRACTION", 0.0)
    b = run("on-host")
    for k, v in load_checkpoint(tmp_path / "on-gpu" / "checkpoint.pt")["model"].items():
        torch.testing.assert_close(v, load_checkpoint(tmp_path / "on-host" / "checkpoint.pt")["model"][k])
    assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-6)
