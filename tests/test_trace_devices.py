"""Attribution on a model spread by accelerate (``device_map``): what a CPU-only machine can
check (accelerate's dispatch hooks around ours, transcoders in another dtype, offloaded
weights refused), and, where CUDA exists, a model split over CPU and GPU with the transcoders
on the GPU giving the same graph."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk.base.errors import IncompatibleModelError
from llamascope_sdk.trace import attribute
from tests.test_trace import IDS, N_LAYERS, tiny_model, transcoders


def _device_map(layer_devices: list[str], rest: str) -> dict[str, str]:
    dm = {"model.embed_tokens": layer_devices[0], "model.rotary_emb": rest, "model.norm": rest,
          "lm_head": rest}
    dm.update({f"model.layers.{i}": d for i, d in enumerate(layer_devices)})
    return dm


def test_dispatched_model_gives_the_same_graph() -> None:
    from accelerate import dispatch_model

    model = tiny_model(torch.float64)
    tcs = transcoders(list(range(N_LAYERS)))
    want = attribute(model, tcs, IDS, batch_size=32)
    dispatched = dispatch_model(tiny_model(torch.float64), _device_map(["cpu"] * N_LAYERS, "cpu"),
                                force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in dispatched.modules())
    got = attribute(dispatched, tcs, IDS, batch_size=32)
    assert torch.equal(got.active_features_A3, want.active_features_A3)
    torch.testing.assert_close(got.edges_RC, want.edges_RC, rtol=0, atol=1e-12)


def test_transcoders_in_another_dtype_than_the_model() -> None:
    model = tiny_model(torch.float64)
    want = attribute(model, transcoders(list(range(N_LAYERS))), IDS, batch_size=32)
    got = attribute(model, transcoders(list(range(N_LAYERS)), torch.float32), IDS, batch_size=32)
    assert got.edges_RC.dtype == torch.float64
    assert torch.equal(got.active_features_A3, want.active_features_A3)
    torch.testing.assert_close(got.edges_RC, want.edges_RC, rtol=1e-5, atol=1e-4)


def test_offloaded_weights_are_refused_in_one_line() -> None:
    from accelerate import cpu_offload

    model = cpu_offload(tiny_model(torch.float32), execution_device=torch.device("cpu"))
    with pytest.raises(IncompatibleModelError, match="offloaded"):
        attribute(model, transcoders([0]), IDS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_split_over_cpu_and_gpu() -> None:
    from accelerate import dispatch_model

    tcs = transcoders(list(range(N_LAYERS)))
    want = attribute(tiny_model(torch.float64), tcs, IDS, batch_size=32)
    split = dispatch_model(tiny_model(torch.float64),
                           _device_map(["cpu", "cuda:0", "cpu"][:N_LAYERS], "cuda:0"))
    got = attribute(split, [t.to("cuda:0") for t in tcs], IDS, batch_size=32)
    torch.testing.assert_close(got.edges_RC, want.edges_RC, rtol=1e-9, atol=1e-9)


def test_an_edge_matrix_beyond_free_memory_is_refused_before_any_backward(monkeypatch) -> None:
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.trace import memory, rows

    model = tiny_model(torch.float32)
    tcs = transcoders(list(range(N_LAYERS)), torch.float32)
    full = attribute(model, tcs, IDS, batch_size=32)
    need = full.info["estimate_bytes"]["host"]
    monkeypatch.setattr(memory, "available_bytes", lambda _d: need // 2)
    monkeypatch.setattr(rows, "backward", lambda *_a: pytest.fail("a backward ran"))
    with pytest.raises(InputError, match=r"use max_feature_nodes \(--max-nodes\) (\d+) or fewer") as e:
        attribute(model, tcs, IDS, batch_size=32)
    fit = int(str(e.value).split("--max-nodes) ")[1].split()[0])
    assert 0 < fit < full.n_features
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_bytes", lambda _d: need // 2)
    small = attribute(model, tcs, IDS, batch_size=32, max_feature_nodes=fit)
    assert small.info["estimate_bytes"]["host"] <= need // 2
