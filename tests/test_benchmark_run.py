"""``benchmark()`` and ``llamascope bench`` end to end on a tiny random Llama (core metrics,
no extra needed): checks before any model loads, the folder rule, values against a direct
computation, and the SAEBench JSON against the schema's required structure.

The schema check runs in two ways: always against the required fields written down below
(names from SAEBench's eval_output_schema_core.json, sae-bench 0.6.0); and, when sae-bench
is installed (``pip install --no-deps sae-bench==0.6.0``), against its schema files themselves
with a small validator of the JSON-Schema keywords those files use ($ref, anyOf, type,
required, properties, items, additionalProperties, minimum), plus ``jsonschema`` when present.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk.base.errors import FolderNotOwnedError, InputError
from llamascope_sdk.benchmark.core import packed_rows
from llamascope_sdk.benchmark.report import SCHEMA_FILES
from llamascope_sdk.benchmark.run import BenchSettings, benchmark, check_settings
from llamascope_sdk.cli import app
from tests.conftest import CharTokenizer
from tests.helpers import tiny_sae

CORE_REQUIRED = {
    "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
    "model_performance_preservation": ["ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"],
    "reconstruction_quality": ["explained_variance", "explained_variance_legacy", "mse", "cossim"],
    "shrinkage": ["l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"],
    "sparsity": ["l0", "l1"],
    "token_stats": ["total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"],
    "misc_metrics": ["freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"]}
_CORPUS = str(Path(__file__).parent / "data" / "corpus" / "wikitext2-valid.txt")
TOP_REQUIRED = ["eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id",
                "sae_lens_version", "sae_cfg_dict"]


# ------------------------------------------------------------ a small JSON-Schema validator
def _type_ok(v: Any, t: str) -> bool:
    return {"object": isinstance(v, dict), "array": isinstance(v, list),
            "string": isinstance(v, str), "boolean": isinstance(v, bool), "null": v is None,
            "integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}[t]


def validate(v: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    if "$ref" in schema:
        return validate(v, root["$defs"][schema["$ref"].split("/")[-1]], root, path)
    if "anyOf" in schema:
        if any(not validate(v, s, root, path) for s in schema["anyOf"]):
            return []
        return [f"{path}: matches no anyOf branch"]
    errors: list[str] = []
    if "type" in schema and not _type_ok(v, schema["type"]):
        return [f"{path}: {v!r} is not {schema['type']}"]
    if "minimum" in schema and v < schema["minimum"]:
        errors.append(f"{path}: {v} < {schema['minimum']}")
    if isinstance(v, dict):
        errors += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in v]
        props = schema.get("properties", {})
        for k, x in v.items():
            if k in props:
                errors += validate(x, props[k], root, f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(x, schema["additionalProperties"], root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {k}")
    if isinstance(v, list) and "items" in schema:
        for i, x in enumerate(v):
            errors += validate(x, schema["items"], root, f"{path}[{i}]")
    return errors


def _installed_schema(eval_type: str) -> dict[str, Any] | None:
    spec = importlib.util.find_spec("sae_bench")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "evals" / SCHEMA_FILES[eval_type]
    return json.loads(path.read_text()) if path.is_file() else None


def test_validator_catches_what_it_should() -> None:
    schema = {"$defs": {"M": {"type": "object", "required": ["x"],
                              "properties": {"x": {"type": "number"}}}},
              "type": "object", "required": ["m"], "properties": {"m": {"$ref": "#/$defs/M"}}}
    assert validate({"m": {"x": 1.5}}, schema, schema) == []
    assert validate({"m": {"x": None}}, schema, schema) == ["$.m.x: None is not number"]
    assert validate({"m": {}}, schema, schema) == ["$.m: missing x"]
    assert validate({}, schema, schema) == ["$: missing m"]


# ------------------------------------------------------------ checks before any model
@pytest.mark.parametrize(("settings", "fragment"), [
    (BenchSettings(metrics=("tpp",)), "arXiv 2605.18229"),
    (BenchSettings(metrics=("scr",)), "should not be used"),
    (BenchSettings(metrics=("core", "ravel")), "unknown metric 'ravel'"),
    (BenchSettings(metrics=("autointerp",), text=_CORPUS), "--endpoint"),
    (BenchSettings(metrics=("core",), text="no-such-file.txt"), "does not exist"),
    (BenchSettings(n_seeds=0), "n_seeds"),
    (BenchSettings(ks=(1, 0)), "every k"),
    (BenchSettings(reg="l3"), "reg must be l1 or l2"),
])
def test_bad_settings_are_one_line(tmp_path: Path, settings: BenchSettings, fragment: str) -> None:
    with pytest.raises((InputError, FileNotFoundError)) as e:
        check_settings(settings, tmp_path / "out")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_folder_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FolderNotOwnedError, match="did not write"):
        check_settings(BenchSettings(metrics=("core",), text=_CORPUS), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_refuses_tpp_in_one_line_before_loading(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "--sae", "no-such-sae", "--metrics", "core,tpp",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    err = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "TPP is not offered" in err[0], res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ a run on a tiny model
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Any) -> Any:
    out = tmp_path_factory.mktemp("bench") / "run"
    corpus = Path(__file__).parent / "data" / "corpus" / "wikitext2-valid.txt"
    saes = {"a": tiny_sae(layer=1, seed=0), "b": tiny_sae(layer=1, seed=1)}
    settings = BenchSettings(metrics=("core",), n_seeds=2, core_tokens=256, core_context=32,
                             text=str(corpus))
    run = benchmark(saes, out=out, model=tiny_llama, tokenizer=CharTokenizer(),
                    settings=settings)
    return run, out, saes, corpus


def test_core_values_match_a_direct_computation(tiny_run: Any, tiny_llama: Any) -> None:
    """L0 and the mean input norm of each sample, from output_hidden_states (not the SDK's
    hooks): hidden_states[2] is the residual stream after layer 1."""
    run, _, saes, corpus = tiny_run
    tok = CharTokenizer()
    rows = packed_rows(tok, str(corpus), rows=2 * 8, context=32)
    for name, sae in saes.items():
        core = next(o for o in run.outputs[name] if o.metric == "core")
        for k in range(2):
            ids = rows[k * 8:(k + 1) * 8]
            with torch.no_grad():
                h = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states[2]
            keep = ~torch.isin(ids, torch.tensor([0, 1, 2]))
            x = h[keep]
            l0 = float((sae.encode(x) != 0).sum(-1).double().mean())
            assert core.spreads["l0"].values[k] == pytest.approx(l0, rel=1e-6)
            assert core.spreads["l2_norm_in"].values[k] == pytest.approx(
                float(x.norm(dim=-1).mean()), rel=1e-4)
        assert core.spreads["l0"].n == 2


def test_outputs_written_and_schema_valid(tiny_run: Any) -> None:
    run, out, _, _ = tiny_run
    assert (out / "comparison.md").read_text() == run.table
    assert "b vs a" in run.table and ("within noise" in run.table or "differs" in run.table)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("a", "b"):
        doc = json.loads((out / name / "core.json").read_text())
        assert all(k in doc for k in TOP_REQUIRED) and doc["eval_type_id"] == "core"
        for group, fields in CORE_REQUIRED.items():
            for f in fields:
                v = doc["eval_result_metrics"][group][f]
                assert isinstance(v, int | float) and math.isfinite(v), (group, f, v)
        spreads = doc["eval_result_unstructured"]["spreads"]
        assert spreads["l0"]["n_seeds"] == 2 and len(spreads["l0"]["values"]) == 2


def test_core_json_validates_against_saebench_schema(tiny_run: Any) -> None:
    schema = _installed_schema("core")
    if schema is None:
        pytest.skip("sae-bench is not installed (pip install --no-deps sae-bench==0.6.0)")
    _, out, _, _ = tiny_run
    doc = json.loads((out / "a" / "core.json").read_text())
    assert validate(doc, schema, schema) == []
    if importlib.util.find_spec("jsonschema") is not None:
        import jsonschema

        jsonschema.validate(doc, schema)


def test_table_marks_noise_and_missing_numbers() -> None:
    from llamascope_sdk.benchmark.report import MetricOutput, table
    from llamascope_sdk.benchmark.spread import spread

    def out(auc: list[float], frac: list[float]) -> list[MetricOutput]:
        return [MetricOutput("probing", {}, {}, [], {"auc": spread(auc)}, [], ("auc",)),
                MetricOutput("absorption", {}, {}, [], {"frac": spread(frac)},
                             ["no letter passed"], ("frac",))]

    text = table({"a": out([0.80, 0.82, 0.81], [0.2, 0.3]),
                  "b": out([0.81, 0.80, 0.83], [math.nan]),
                  "c": out([0.90, 0.91, 0.89], [0.25, 0.35])})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "+0.003 (within noise)" in rows["probing: auc"]
    assert "+0.090 (differs)" in rows["probing: auc"]
    assert "| no number |" in rows["absorption: frac"]
    assert "no number for b: no letter passed" in text


def test_core_without_text_or_datasets_says_what_to_give(tmp_path: Path) -> None:
    if importlib.util.find_spec("sae_probes") is not None:
        pytest.skip("sae-probes is installed: its prompts are the default text")
    from llamascope_sdk.base.errors import DataUnavailableError

    with pytest.raises(DataUnavailableError, match="--text FILE"):
        check_settings(BenchSettings(metrics=("core",)), tmp_path / "o")


def test_autointerp_run_against_the_fake_endpoint(tmp_path: Path, tiny_llama: Any) -> None:
    """The whole autointerp path (capture, excerpts, one explainer and one scorer request per
    feature, the SAEBench JSON) with a scorer that answers 0 for every excerpt: each feature
    scores its share of inactive excerpts, which the test reads from the requests."""
    import re

    from tests.fake_endpoint import FakeEndpoint

    def excerpts(messages: list[dict[str, str]]) -> list[str]:
        return re.findall(r"^Example \d+: (.*)$", messages[-1]["content"], flags=re.M)

    def reply(messages: list[dict[str, str]]) -> str:
        if "list of 0s and 1s" in messages[0]["content"]:
            return str([0] * len(excerpts(messages)))
        return "letters"

    with FakeEndpoint(reply=reply) as fake:
        settings = BenchSettings(metrics=("autointerp",), n_seeds=2, text=_CORPUS,
                                 autointerp_features=3, autointerp_tokens=4096,
                                 endpoint=fake.url, endpoint_model="judge")
        run = benchmark({"a": tiny_sae(layer=1, seed=0)}, out=tmp_path / "o", model=tiny_llama,
                        tokenizer=CharTokenizer(), settings=settings)
    (out,) = run.outputs["a"]
    scored = out.details  # features with enough activations for the protocol, both seeds
    assert 1 <= len(scored) <= 6 and all(f["explanation"] == "letters" for f in scored)
    n_scorer = sum("list of 0s and 1s" in r["messages"][0]["content"] for r in fake.requests)
    assert n_scorer == len(scored) == len(fake.requests) // 2
    per_seed = run.outputs["a"][0].spreads["autointerp_score"].values
    assert len(per_seed) == 2 and all(0.0 <= v < 1.0 for v in per_seed)
    doc = json.loads((tmp_path / "o" / "a" / "autointerp.json").read_text())
    assert doc["eval_type_id"] == "autointerp"
    m = doc["eval_result_metrics"]["autointerp"]
    assert m["autointerp_score"] == pytest.approx(sum(per_seed) / 2)
    schema = _installed_schema("autointerp")
    if schema is not None:
        assert validate(doc, schema, schema) == []


def test_probing_run_and_its_saebench_json(tmp_path: Path, tiny_llama: Any) -> None:
    """Probing on one real sae-probes dataset with the tiny model: the dense baseline and the
    SAE probes per dataset, the JSON (schema-checked when sae-bench is installed), and the
    dense baseline read back from the cache by a second run."""
    if importlib.util.find_spec("sae_probes") is None or importlib.util.find_spec("sklearn") is None:
        pytest.skip("needs the bench extra and sae-probes (pip install --no-deps sae-probes==0.4.2)")
    settings = BenchSettings(metrics=("probing",), n_seeds=2, ks=(1, 2),
                             datasets=["119_us_state_TX"])
    sae = tiny_sae(layer=1, seed=0)
    run = benchmark({"a": sae}, out=tmp_path / "o", model=tiny_llama, tokenizer=CharTokenizer(),
                    settings=settings)
    (out,) = run.outputs["a"]
    (det,) = out.details
    assert det["dataset_name"] == "119_us_state_TX"
    for key in ("llm_test_auc", "sae_top_1_test_auc", "sae_top_2_test_accuracy"):
        assert 0.0 <= det[key] <= 1.0
    doc = json.loads((tmp_path / "o" / "a" / "sparse_probing_sae_probes.json").read_text())
    assert doc["eval_result_metrics"]["llm"]["llm_test_auc"] == pytest.approx(
        out.spreads["llm_test_auc"].mean)
    schema = _installed_schema("sparse_probing_sae_probes")
    if schema is not None:
        assert validate(doc, schema, schema) == []
    again = benchmark({"b": sae}, out=tmp_path / "o", model=tiny_llama, tokenizer=CharTokenizer(),
                      settings=settings)
    assert again.timing["activation_forward_s"] == 0.0  # activations and baselines cached
    assert again.outputs["b"][0].spreads["llm_test_auc"] == out.spreads["llm_test_auc"]
    assert again.outputs["b"][0].spreads["sae_top_2_test_auc"] == out.spreads["sae_top_2_test_auc"]


def test_absorption_json_structure() -> None:
    from llamascope_sdk.benchmark.absorption import AbsorptionResult, LetterResult
    from llamascope_sdk.benchmark.outputs import absorption_output
    from llamascope_sdk.benchmark.report import saebench_json
    from llamascope_sdk.benchmark.spread import spread

    letters = [LetterResult("s", 0.9, [0], 20, 0.25, 0.25, 5),
               LetterResult("t", 0.8, [3, 4], 10, 0.1, 0.0, 0),
               LetterResult("x", 0.4, [7], 3, 1.0, 1.0, 3)]  # below the F1 gate: left out
    r = AbsorptionResult(spread([0.175, 0.2]), spread([0.125, 0.1]), spread([1.5, 1.5]),
                         [letters], 100)
    doc = saebench_json(absorption_output(r, {"model_name": "m"}), "sae", {})
    mean = doc["eval_result_metrics"]["mean"]
    assert mean["mean_absorption_fraction_score"] == pytest.approx(0.1875)
    assert mean["std_dev_absorption_fraction_score"] == pytest.approx(0.1060660, rel=1e-5)
    assert [d["first_letter"] for d in doc["eval_result_details"]] == ["s", "t"]
    schema = _installed_schema("absorption_first_letter")
    if schema is not None:
        assert validate(doc, schema, schema) == []


def test_absorption_refuses_transcoders_before_the_model(tmp_path: Path) -> None:
    tc = tiny_sae(layer=1, position="TC")
    with pytest.raises(InputError, match="not defined for transcoders"):
        benchmark({"tc": tc}, out=tmp_path / "o", model="no-such-model-is-loaded",
                  settings=BenchSettings(metrics=("absorption",)))


def test_core_runs_on_a_transcoder(tmp_path: Path, tiny_llama: Any) -> None:
    """Input and output sites differ (ln2 normalised in, MLP out): both are read, the output
    site is the one zeroed and spliced."""
    run = benchmark({"tc": tiny_sae(layer=1, position="TC")}, out=tmp_path / "o",
                    model=tiny_llama, tokenizer=CharTokenizer(),
                    settings=BenchSettings(metrics=("core",), n_seeds=1, core_tokens=128,
                                           core_context=32, text=_CORPUS))
    (core,) = run.outputs["tc"]
    assert core.spreads["l0"].mean > 0 and math.isfinite(core.spreads["kl_div_with_ablation"].mean)
    assert core.spreads["kl_div_with_ablation"].mean > 0
