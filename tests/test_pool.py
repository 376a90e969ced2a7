"""SaePool: LRU within a byte budget, held SAEs kept, one load for concurrent first requests,
steers from decoder rows alone, and the memory it really uses (measured in subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from llamascope_sdk import SAE, Steer
from llamascope_sdk.base.errors import InputError, PoolBusyError, SaeBudgetError
from llamascope_sdk.steering.generation import describe
from llamascope_sdk.steering.pool import SaePool, parse_bytes
from llamascope_sdk.steering.row_edits import VectorEdit
from tests.helpers import make_release

D, F = 64, 256
#: bytes of one (D, F) SAE in fp32, counted by hand: W_enc, W_dec, b_enc, b_dec, threshold,
#: decoder_norm (fp32)
SIZE = (2 * F * D + F + D + 1) * 4 + 4 * F
#: what a load needs while it runs, reserved beside it: three raw [D, F] bf16 tensors
LOADING = 3 * F * D * 2


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    return [make_release(tmp_path / f"sae{i}", layer=i % 3, d_model=D, d_sae=F, seed=i)
            for i in range(6)]


def _simulate(trace: list[int], capacity: int) -> tuple[int, int, list[int], list[int]]:
    """An independent LRU: (hits, misses, evicted in order, resident least recent first)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    evicted: list[int] = []
    for i in trace:
        if i in cache:
            hits += 1
            cache.move_to_end(i)
            continue
        misses += 1
        if len(cache) == capacity:
            evicted.append(cache.popitem(last=False)[0])
        cache[i] = None
    return hits, misses, evicted, list(cache)


def test_size_counted_by_hand_matches_a_loaded_sae(folders) -> None:
    pool = SaePool(10**9)
    pool.get(str(folders[0]))
    assert pool.used == SIZE


def test_eviction_order_and_counts_follow_a_scripted_trace(folders) -> None:
    trace = [0, 1, 2, 0, 3, 4, 0, 1, 1, 5, 2, 3, 0, 4, 4, 5, 1]
    pool = SaePool(3 * SIZE + LOADING + 100)
    keys = [pool.key(str(f)) for f in folders]
    for i in trace:
        sae = pool.get(str(folders[i]))
        assert sae.source.path == str(folders[i])
        assert pool.used <= pool.budget
    hits, misses, evicted, resident = _simulate(trace, 3)
    assert (pool.hits, pool.misses) == (hits, misses)
    assert pool.evicted == [keys[i] for i in evicted]
    assert pool.loaded() == [keys[i] for i in resident]
    assert misses == 13 and len(evicted) == 10  # the trace really exercises eviction


def test_spellings_of_one_sae_share_one_entry(folders, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pool = SaePool(10**9)
    a = pool.get(str(folders[0]))
    b = pool.get("sae0")
    c = pool.get(str(folders[0]) + "/")
    assert a is b is c and (pool.hits, pool.misses) == (2, 1)
    assert pool.get("demo") is pool.get("smollm2-135m-L15R-8x")


def test_held_sae_is_never_evicted(folders) -> None:
    pool = SaePool(2 * SIZE + LOADING + 100)
    held = pool.acquire(str(folders[0]))
    for i in (1, 2, 3, 4):
        pool.get(str(folders[i]))
    assert pool.key(str(folders[0])) in pool.loaded()
    assert pool.key(str(folders[0])) not in pool.evicted
    second = pool.acquire(str(folders[4]))
    with pytest.raises(PoolBusyError, match="taken by SAEs in use"):
        pool.get(str(folders[5]))
    assert pool.used <= pool.budget
    pool.release(held)
    pool.get(str(folders[5]))  # now the released one can go
    assert pool.evicted[-1] == pool.key(str(folders[0]))
    pool.release(second)
    with pytest.raises(ValueError, match="not held"):
        pool.release(str(folders[4]))


def test_an_sae_larger_than_the_budget_is_refused_before_loading(folders) -> None:
    loads = []
    pool = SaePool(SIZE - 1, loader=lambda n: loads.append(n) or SAE.from_pretrained(n))
    with pytest.raises(SaeBudgetError, match="more than the whole SAE memory budget"):
        pool.get(str(folders[0]))
    assert loads == [] and pool.loaded() == []


def test_concurrent_first_requests_load_once(folders) -> None:
    loads: list[str] = []

    def slow_loader(name: str) -> SAE:
        loads.append(name)
        time.sleep(0.5)
        return SAE.from_pretrained(name)

    pool = SaePool(10**9, loader=slow_loader)
    barrier = threading.Barrier(16)
    got: list[SAE] = []

    def client() -> None:
        barrier.wait(timeout=30)
        got.append(pool.get(str(folders[2])))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 16 and all(s is got[0] for s in got)
    assert len(loads) == 1 and (pool.misses, pool.hits) == (1, 15)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_steer_from_decoder_rows_equals_the_full_steer(folders, dtype) -> None:
    pool = SaePool(10**9, dtype=dtype)
    edit, text = pool.steer_edit(str(folders[1]), [7, 200], [3.0, -2.5], positions="generated")
    assert isinstance(edit, VectorEdit) and pool.loaded() == [] and pool.misses == 0
    full = SAE.from_pretrained(folders[1], dtype=dtype)
    iv = Steer(full, [7, 200], [3.0, -2.5], positions="generated")
    assert torch.equal(edit.vector, iv.coefficients().to(full.dtype) @ full.W_dec[iv.idx])
    assert text == describe(iv)
    assert edit.site.hook_point == full.hyperparams.hook_point_out
    # once loaded, the pool hands out the plain Steer
    pool.get(str(folders[1]))
    iv2, text2 = pool.steer_edit(str(folders[1]), [7, 200], [3.0, -2.5], positions="generated")
    assert isinstance(iv2, Steer) and text2 == text


def test_relative_steer_from_rows_uses_the_stats_file(folders) -> None:
    from llamascope_sdk import FeatureStats

    full = SAE.from_pretrained(folders[3])
    typical = torch.rand(F) + 0.5
    full.stats = FeatureStats(typical=typical, frequency=torch.full((F,), 0.01), mean=typical / 10,
                              n_tokens=1000)
    full.stats.save(folders[3])
    pool = SaePool(10**9)
    edit, text = pool.steer_edit(str(folders[3]), [5], 2.0, relative=True)
    iv = Steer(SAE.from_pretrained(folders[3]), [5], 2.0, relative=True)
    assert isinstance(edit, VectorEdit)
    assert torch.equal(edit.vector, iv.coefficients() @ iv.sae.W_dec[iv.idx])
    assert text == describe(iv) and "x typical activation" in text


def test_bad_features_and_sizes_are_one_line_errors(folders) -> None:
    pool = SaePool(10**9)
    with pytest.raises(IndexError, match=r"feature index 256 is out of range; allowed are 0\.\.255"):
        pool.steer_edit(str(folders[0]), [256], 1.0)
    with pytest.raises(InputError, match="not an integer"):
        pool.steer_edit(str(folders[0]), [1.5], 1.0)
    with pytest.raises(InputError, match="finite"):
        pool.steer_edit(str(folders[0]), [1], float("nan"))
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(InputError, match="512MB, 8GB"):
        parse_bytes("lots")


BIG_TRACE = list(range(12)) + [0, 5, 11, 3, 3, 7]
_MEMORY_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from llamascope_sdk.steering.pool import SaePool

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

folders = sys.argv[2:]
TRACE = json.loads(sys.stdin.readline())
pool = SaePool("512MB")
torch.zeros(1)
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
if sys.argv[1] == "trace":
    for i in TRACE:
        pool.get(folders[i]).encode(torch.randn(2, 576))
    out = {"peak": rss("VmHWM") - base, "evicted": len(pool.evicted), "loaded": len(pool.loaded())}
else:
    edit, text = pool.steer_edit(folders[0], [123], 5.0)
    out = {"peak": rss("VmHWM") - base, "kind": type(edit).__name__, "loaded": len(pool.loaded())}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def big_folders(tmp_path_factory) -> list[str]:
    """12 SAEs shaped like SmolLM2 64x (D=576, F=36,864; ~170 MB each in fp32), bf16 files."""
    from tests.helpers import raw_tensors, release_hyperparams, write_release

    root = tmp_path_factory.mktemp("big")
    tensors = raw_tensors(576, 36864, seed=0)
    out = []
    for i in range(12):
        hp = release_hyperparams(layer=i, d_model=576, d_sae=36864)
        out.append(str(write_release(root / f"L{i}R-64x", hp, tensors)))
    return out


def _run(mode: str, folders: list[str]) -> dict:
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode, *folders], cwd=repo,
                         capture_output=True, text=True, timeout=600, input=json.dumps(BIG_TRACE) + "\n",
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_twelve_64x_saes_stay_within_a_512mb_budget(big_folders) -> None:
    got = _run("trace", big_folders)
    # 3 x 170 MB would fit 512 MB, but not with the ~127 MB a load needs while it runs
    _, _, evicted, resident = _simulate(BIG_TRACE, 2)
    assert got["loaded"] == len(resident) == 2 and got["evicted"] == len(evicted)
    assert got["peak"] <= 512e6 * 1.15, f"peak RSS grew by {got['peak'] / 1e6:.0f} MB"


@pytest.mark.slow
def test_adding_a_feature_of_an_unloaded_64x_sae_costs_under_16mb(big_folders) -> None:
    got = _run("add", big_folders)
    assert got["kind"] == "VectorEdit" and got["loaded"] == 0
    assert got["peak"] < 16 * 2**20, f"peak RSS grew by {got['peak'] / 1e6:.1f} MB"


from tests.fakehub import fake_hub_fixture  # noqa: E402, F401  (fixture)


def test_llama_scope_names_by_any_spelling_share_one_entry(fake_hub) -> None:
    pool = SaePool(10**9)
    a = pool.get("L12R-8x")
    assert pool.get("l12r_8x") is a and (pool.hits, pool.misses) == (1, 1)
    assert pool.loaded() == ["L12R-8x"]
    edit, text = pool.steer_edit("L12M-32x", [3, 9], 2.0)  # downloaded, then rows only
    full = SAE.from_pretrained("L12M-32x")
    iv = Steer(full, [3, 9], 2.0)
    assert isinstance(edit, VectorEdit) and pool.loaded() == ["L12R-8x"]
    assert torch.equal(edit.vector, iv.coefficients() @ full.W_dec[iv.idx])
    assert text == describe(iv)
