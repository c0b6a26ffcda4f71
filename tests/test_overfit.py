"""Each stage's loss falls by at least half when it overfits one tiny batch (≤ 50 steps)."""

import pytest
import torch
from conftest import noise

from echox.model.batch import collate_t2c
from echox.model.prompt import Turn


def _s2t_batch(m):
    return m.collate([
        [Turn("user", audio=noise(1.5, 1), transcript="capital of france"),
         Turn("assistant", text="Paris.")],
        [Turn("user", audio=noise(2.0, 2), transcript="a color"),
         Turn("assistant", text="Blue is a color.")],
    ])


def _overfit(params, loss_fn, steps, lr):
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss_fn().item()


def test_s2t_overfits(make_model):
    m = make_model()
    m.train()
    b = _s2t_batch(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any(n.startswith("adapter.") for n in trainable)
    assert not any(n.startswith("encoder.") for n in trainable)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable)
    first, last = _overfit(m.parameters(), lambda: m.forward_s2t(b).loss, 40, 1e-2)
    assert last <= 0.5 * first, (first, last)


def test_t2c_overfits(make_model):
    m = make_model()
    m.set_trainable({"adapter": False, "llm": False, "t2c": True, "echo": False, "denoiser": False})
    m.train()
    g = torch.Generator().manual_seed(0)
    texts = ["hello world", "the cat sat"]
    ids = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    units = [torch.randint(0, m.t2c.num_units, (n,), generator=g).tolist() for n in (12, 18)]
    batch = collate_t2c(ids, units)
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"t2c"}
    first, last = _overfit(m.parameters(), lambda: m.forward_t2c(batch)[0], 40, 3e-3)
    assert last <= 0.5 * first, (first, last)


def test_echo_overfits(make_model):
    m = make_model()
    m.set_trainable({"t2c": False, "echo": True, "denoiser": True})
    m.train()
    b = _s2t_batch(m)
    g = torch.Generator().manual_seed(1)
    units = [torch.randint(0, m.t2c.num_units, (n,), generator=g).tolist() for n in (8, 14)]
    out0 = m.forward_echo(b, units)
    assert out0.echo > 0 and out0.den > 0 and out0.s2t > 0
    assert 0 < out0.lam <= m.config.loss.den_lambda
    t2c_before = {k: v.clone() for k, v in m.t2c.state_dict().items()}
    first, last = _overfit(m.parameters(), lambda: m.forward_echo(b, units).loss, 40, 3e-3)
    assert last <= 0.5 * first, (first, last)
    m.forward_echo(b, units).loss.backward()
    assert all(p.grad is None for p in m.t2c.parameters())  # T2C stays frozen
    assert all(torch.equal(v, m.t2c.state_dict()[k]) for k, v in t2c_before.items())


def test_echo_den_reduction_follows_the_config(make_model):
    """`loss.den_reduction`: sum (per segment, averaged over segments) or mean over tokens."""
    units = [[1, 2, 3], [4, 5, 6, 7]]
    den = {}
    for red in ("sum", "mean"):
        m = make_model([f"loss.den_reduction={red}"])
        m.eval()
        den[red] = float(m.forward_echo(_s2t_batch(m), units).den.detach())
    texts = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Paris.", "Blue is a color.")]
    tokens = sum(len(t) for t in texts)
    assert den["sum"] == pytest.approx(den["mean"] * tokens / 2, rel=1e-4)  # 2 segments


def test_echo_online_pseudo_labels_come_from_frozen_t2c(make_model):
    from echox.model.generation import SamplingConfig

    m = make_model(["t2c.max_positions=64"])
    m.eval()
    b = _s2t_batch(m)
    out = m.forward_echo(b)  # no units: decoded online from Emb(X′) by the frozen T2C
    texts = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Paris.", "Blue is a color.")]
    expected = m.pseudo_labels(texts, SamplingConfig(max_new_tokens=32))
    assert out.targets == expected
