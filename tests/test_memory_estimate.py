"""tools/benchmarks/memory_estimate.py: the meta-device memory tracker, the flash-style attention stand-in, and
the CLI over the shipped sd15_* / sdxl_* training configs."""

from __future__ import annotations

import contextlib
import json

import torch

import tools.benchmarks.memory_estimate as me

GIB = 2**30


def _chain(k: int, d: int, trainable: bool) -> torch.nn.Sequential:
    with torch.device("meta"):
        net = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(k)])
    return net.requires_grad_(trainable)


def test_tracker_counts_a_linear_chain_by_hand():
    b, d, k = 8, 64, 5
    unit = b * d * 4  # one [b, d] float32 activation
    x = torch.empty(b, d, device="meta")  # made outside the tracker: not counted

    # no grad: each layer's output is allocated while its input is alive, then the input is freed
    net = _chain(k, d, trainable=False)  # parameters made before the tracker: not counted
    tr = me.MemoryTracker()
    with torch.no_grad(), tr:
        h = x
        for layer in net:
            h = layer(h)
        assert tr.cur == unit
        v = h.t().view(-1, b)  # views share the storage: nothing new
        assert tr.cur == unit
        c = h.t().reshape(-1)  # a transposed tensor cannot be flattened in place: a copy
        assert tr.cur == 2 * unit
        del h, v, c
    assert tr.peak == 2 * unit and tr.cur == 0

    # trainable weights: autograd keeps every layer's input for the weight's gradient
    net = _chain(k, d, trainable=True)
    tr = me.MemoryTracker()
    with tr:
        out = net(x)
        assert tr.cur == k * unit  # outputs 1..k: k - 1 saved inputs and the output
        del out
    assert tr.peak == k * unit and tr.cur == 0

    # frozen weights, input needing a gradient: only the weights are saved, activations are freed
    net = _chain(k, d, trainable=False)
    tr = me.MemoryTracker()
    with tr:
        out = net(x.clone().requires_grad_(True))
        assert tr.cur == unit + unit  # the clone (the graph's leaf) and the output
        del out


def _attention_peak(L: int, patched: bool) -> int:
    b, h, dh = 1, 2, 8
    tr = me.MemoryTracker()
    ctx = me.flash_attention() if patched else contextlib.nullcontext()
    with ctx, tr:
        q, k, v = (torch.empty(b, h, L, dh, device="meta", requires_grad=True) for _ in range(3))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.sum().backward()
        del out, q, k, v
    return tr.peak


def test_flash_attention_keeps_linear_memory():
    original = torch.nn.functional.scaled_dot_product_attention
    small, large = _attention_peak(1024, True), _attention_peak(2048, True)
    assert torch.nn.functional.scaled_dot_product_attention is original  # restored
    assert 1.9 < large / small < 2.1  # O(L)
    # the meta device's own path (math) materialises [B, H, L, L]: quadratic, what the stand-in avoids
    math_small, math_large = _attention_peak(1024, False), _attention_peak(2048, False)
    assert math_large / math_small > 3.5
    assert math_large > 10 * large


def test_sd15_unet_parameters_and_activations():
    p, p_all = me.param_counts("sd15", 0, ())
    assert p == p_all and 855e6 < p < 865e6  # SD1.5's 860M
    lora, p_all_lora = me.param_counts("sd15", 8, ("to_q", "to_k", "to_v", "to_out.0"))
    assert 1e6 < lora < 2e6 and p_all_lora == p_all + lora
    full = me.trace_policy("sd15", "fp16", 4, False, 0, ())
    ckpt = me.trace_policy("sd15", "fp16", 4, True, 0, ())
    # a few GiB at 4 images with O(L) attention (the math path would hold ~15 GB of attention matrices)
    assert 1 * GIB < full["peak"] < 8 * GIB
    assert ckpt["peak"] < full["peak"] / 2 and ckpt["after_forward"] < full["after_forward"] / 4
    assert me.trace_nograd("sd15", "fp16", 4, 0, (), True) < full["peak"] / 4


def test_states_scale_with_world_and_lora(tmp_path):
    path = me.REPO / "configs" / "train" / "sd15_dpo.yaml"
    s8, s1 = me.load_setting(path, [], 8), me.load_setting(path, [], 1)
    assert s8.images == 4 and s8.bucket_buffers == 2 and s8.reduce_bucket > 0
    st8, st1 = me.states(s8, 8), me.states(s1, 1)
    p = st8["params_trainable"]
    assert st8["persistent"]["fp32_master"] == 4 * -(-p // 8) and st1["persistent"]["fp32_master"] == 4 * p
    assert st8["persistent"]["module"] == st8["persistent"]["reference"] == 2 * st8["params_all"]
    lora = me.states(me.load_setting(path, ["model.lora_rank=8"], 8), 8)
    assert "reference" not in lora["persistent"]  # the policy with its adapters disabled
    d3po = me.load_setting(me.REPO / "configs" / "train" / "sd15_d3po.yaml", [], 8)
    assert d3po.images == 8  # 2 pairs x 2 images x 2 for guidance


def test_cli_on_the_shipped_configs(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert me.main(["--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    shipped = me.shipped_configs()
    names = {p.stem for p in shipped}
    assert names and all(n.startswith(("sd15_", "sdxl_")) for n in names)
    rows = [line for line in text.splitlines() if line.startswith("| sd")]
    assert sorted(r.split("|")[1].strip() for r in rows) == sorted(names)
    doc = json.loads(out.read_text())
    assert doc["world"] == 8 and len(doc["rows"]) == len(shipped)
    for r in doc["rows"]:
        assert r["total_gib"] > r["states_gib"] > 0 and r["activations_gib"] > 0
        assert set(r["gpus"]) == {g for g, _ in me.GPUS}
    sdxl = {r["config"]: r for r in doc["rows"]}["sdxl_dpo.yaml"]
    assert sdxl["params_all"] > 2.5e9 and not sdxl["gpus"]["V100-16"]["fits"]
