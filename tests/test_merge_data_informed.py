"""Data-informed merges: the statistics pass and its cache, fisher, regmean, AIM and LEWIS.

Defining properties on small tensors (RegMean with alpha = 1 is the least-squares merge on the concatenated
inputs; Fisher with equal Fishers is the weighted average; AIM with omega = 0 is the identity), and on the
``test`` zoo: the pass's cache (a second call loads, changed inputs recompute), the same bits on disk and
in place, and `evomerge merge` on a regmean recipe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evomerge.errors import ConfigError
from evomerge.merge.methods import METHODS
from evomerge.merge.stats import MergeStats, aim_adjust, collect, load_or_collect, recipe_stats
from evomerge.recipe import Recipe

G = torch.Generator().manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# ------------------------------------------------------------------ defining properties
def test_regmean_alpha1_is_least_squares_on_concatenated_inputs() -> None:
    base, n, out, inp = _rand(5, 7), 3, 5, 7
    deltas = _rand(n, out, inp) * 0.3
    xs = [_rand(20 + 5 * i, inp) for i in range(n)]
    grams = torch.stack([x.T @ x for x in xs])
    merged = METHODS.get("regmean").fn(base, deltas, {}, {"alpha": 1.0, "ridge": 0.0}, stats={"gram": grams})
    x_cat = torch.cat(xs)
    y_cat = torch.cat([x @ (base + deltas[i]).T for i, x in enumerate(xs)])
    lstsq = torch.linalg.lstsq(x_cat, y_cat).solution.T
    torch.testing.assert_close(merged, lstsq, rtol=1e-9, atol=1e-9)
    # alpha = 0 with identical diagonal Grams is the plain average
    eye = torch.eye(inp, dtype=torch.float64).expand(n, inp, inp) * 2.0
    avg = METHODS.get("regmean").fn(base, deltas, {}, {"alpha": 0.0, "ridge": 0.0}, stats={"gram": eye})
    torch.testing.assert_close(avg, base + deltas.mean(0))
    with pytest.raises(ValueError, match="gram"):
        METHODS.get("regmean").fn(base, deltas, {}, {})


def test_fisher_equal_fishers_is_weighted_average_and_weights_are_genes() -> None:
    base, deltas = _rand(4, 6), _rand(3, 4, 6)
    f = _rand(4, 6).abs().expand(3, 4, 6).clone()
    w = [0.2, 0.5, 0.9]
    fn = METHODS.get("fisher").fn
    merged = fn(base, deltas, {"weight": w}, {}, stats={"fisher": f})
    wt = torch.tensor(w, dtype=torch.float64).reshape(3, 1, 1)
    torch.testing.assert_close(merged, base + (wt * deltas).sum(0) / sum(w))
    scaled = fn(base, deltas, {"weight": [3 * x for x in w]}, {}, stats={"fisher": f})
    torch.testing.assert_close(scaled, merged)
    # where only model 0 has Fisher mass, the entry is model 0's
    f2 = torch.zeros(3, 4, 6, dtype=torch.float64)
    f2[0] = 1.0
    f2[1, :, 0] = 1.0
    got = fn(base, deltas, {}, {"floor": 0.0}, stats={"fisher": f2})
    torch.testing.assert_close(got[:, 1:], (base + deltas[0])[:, 1:])
    torch.testing.assert_close(got[:, 0], base[:, 0] + deltas[:2, :, 0].mean(0))
    with pytest.raises(ConfigError, match="sum to 0"):
        fn(base, deltas, {"weight": [0.0, 0.0, 0.0]}, {}, stats={"fisher": f})


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_scale_with_equal_statistics_is_task_arithmetic(method: str) -> None:
    """With equal statistics, scale s_i and data weights w_i give task arithmetic with weights s_i w_i / sum w."""
    base, n = _rand(4, 6), 3
    deltas = _rand(n, 4, 6)
    w, s = [0.2, 0.5, 0.9], [2.0, 0.5, 1.5]
    x = _rand(12, 6)
    stats = {"gram": (x.T @ x).expand(n, 6, 6).clone()} if method == "regmean" else {
        "fisher": _rand(4, 6).abs().expand(n, 4, 6).clone()}
    gp = {"alpha": 0.6, "ridge": 0.0} if method == "regmean" else {}
    fn = METHODS.get(method).fn
    got = fn(base, deltas, {"weight": w, "scale": s}, gp, stats=stats)
    ta = METHODS.get("task_arithmetic").fn(base, deltas, {"weight": [si * wi / sum(w) for si, wi in zip(s, w, strict=True)]}, {})
    torch.testing.assert_close(got, ta, rtol=1e-9, atol=1e-9)
    # scale 1 is the paper's merge, and the merge is linear in the scales
    paper = fn(base, deltas, {"weight": w}, gp, stats=stats)
    torch.testing.assert_close(fn(base, deltas, {"weight": w, "scale": [1.0] * n}, gp, stats=stats), paper)
    doubled = fn(base, deltas, {"weight": w, "scale": [2.0] * n}, gp, stats=stats)
    torch.testing.assert_close(doubled - base, 2 * (paper - base))


def test_aim_omega_zero_is_identity_and_salient_channels_move_least() -> None:
    base, merged = _rand(3, 4), _rand(3, 4)
    act = torch.tensor([0.5, 2.0, 0.0, 1.0])
    assert torch.equal(aim_adjust(base, merged, act, 0.0), merged)
    out = aim_adjust(base, merged, act, 1.0)
    torch.testing.assert_close(out[:, 1], base[:, 1])  # the most active channel stays at the base
    torch.testing.assert_close(out[:, 2], merged[:, 2])  # an unused channel keeps the merge
    torch.testing.assert_close(out[:, 0], base[:, 0] + 0.75 * (merged[:, 0] - base[:, 0]))


def test_lewis_densities_follow_importance() -> None:
    from evomerge.merge.lewis import layer_importance, lewis_densities

    assert lewis_densities([1.0, 2.0, 3.0], 0.4, spread=0.0) == [0.4, 0.4, 0.4]
    d = lewis_densities([1.0, 2.0, 3.0], 0.4)
    assert d == pytest.approx([0.2, 0.4, 0.6]) and sum(d) / 3 == pytest.approx(0.4)
    assert lewis_densities([0.0, 10.0], 0.5, high=0.9) == [0.05, 0.9]
    name = "model.layers.{}.mlp.down_proj.weight"
    base = {name.format(i): torch.ones(4) for i in range(2)}
    moved = {name.format(0): torch.ones(4), name.format(1): torch.full((4,), 3.0)}
    st = MergeStats({"base": {"act": base}, "a": {"act": moved}})
    assert layer_importance(st, "base", "a", 2) == pytest.approx([0.0, 2.0])
    with pytest.raises(ConfigError, match="density"):
        lewis_densities([1.0], 1.5)


# ------------------------------------------------------------------ the pass and its cache, on the zoo
def _recipe(zoo, method: str = "regmean", **data) -> Recipe:
    return Recipe(method=method, base_model="base", models=({"model": "add"}, {"model": "rev"}),
                  parameters={"alpha": 0.9} if method == "regmean" else {},
                  data={"suite": "builtin:zoo-2", "examples": 3, **data},
                  sources={"base": str(zoo.base), "add": str(zoo.expert("add")), "rev": str(zoo.expert("rev"))})


@pytest.fixture(scope="module")
def requests_(zoo_test):
    from transformers import AutoTokenizer

    from evomerge.merge.stats import calibration_requests
    from evomerge.recipe import DataSpec
    from evomerge.scoring.suite import load_suite

    tok = AutoTokenizer.from_pretrained(zoo_test.base)
    return calibration_requests(load_suite("builtin:zoo-2"), tok, DataSpec(suite="builtin:zoo-2", examples=3))


def test_stats_pass_collects_and_caches(zoo_test, requests_, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert len(requests_) == 6 and all(ctx and cont for ctx, cont in requests_)
    folder = zoo_test.expert("add")
    kinds = ("act", "fisher", "gram")
    first, rec1 = load_or_collect(folder, requests_, kinds, tmp_path)
    assert rec1.computed and rec1.path.parent == tmp_path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    q = "model.layers.0.self_attn.q_proj.weight"
    g, a = first["gram"][q], first["act"][q]
    assert g.shape == (model.config.hidden_size,) * 2 and torch.allclose(g, g.T) and (torch.diagonal(g) > 0).all()
    assert a.shape == (model.config.hidden_size,) and (a > 0).any()
    assert set(first["fisher"]) == {n for n, _ in model.named_parameters()}
    assert all(bool((f >= 0).all()) for f in first["fisher"].values()) and first["fisher"][q].sum() > 0
    again, rec2 = load_or_collect(folder, requests_, kinds, tmp_path)
    assert not rec2.computed and rec2.path == rec1.path
    assert all(torch.equal(again[k][n], first[k][n]) for k in kinds for n in first[k])
    _, rec3 = load_or_collect(folder, requests_[:-1], kinds, tmp_path)  # another example set
    _, rec4 = load_or_collect(zoo_test.expert("rev"), requests_, kinds, tmp_path)  # another model
    _, rec5 = load_or_collect(folder, requests_, kinds, tmp_path, max_gram_features=8)  # another bound
    assert rec3.computed and rec4.computed and rec5.computed
    assert len({rec1.path, rec3.path, rec4.path, rec5.path}) == 4
    # the in-process pass gives what the cache holds; the bound drops every Gram matrix past it
    direct = collect(model, requests_, ("gram",), max_gram_features=8)
    assert direct["gram"] == {}
    rec1.path.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="unreadable statistics"):
        load_or_collect(folder, requests_, kinds, tmp_path)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_informed_merge_same_bits_on_disk_and_in_place(zoo_test, tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import InPlaceMerger, materialize_state_dict, materialize_to_disk
    from evomerge.merge.sources import ResidentSources

    recipe = _recipe(zoo_test, method, aim=0.5)
    stats, records = recipe_stats(recipe, recipe.sources, tmp_path / "stats")
    assert stats is not None and {r.computed for r in records} == {True}
    assert set(stats.models) == {"base", "add", "rev"}  # AIM reads the base's activations
    out = materialize_to_disk(recipe, tmp_path / "out", stats=stats)
    live = AutoModelForCausalLM.from_pretrained(zoo_test.base, dtype=torch.float32)
    InPlaceMerger(ResidentSources.load(recipe.sources, "base", ["add", "rev"]), live, stats).apply(recipe)
    disk = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, t in live.state_dict().items():
        assert torch.equal(t, disk[name]), name
    plain = materialize_state_dict(recipe.model_copy(update={"data": recipe.data.model_copy(update={"aim": 0.0})}),
                                   stats=stats)
    ta = materialize_state_dict(Recipe(method="linear", base_model="base", sources=recipe.sources,
                                       models=({"model": "add", "parameters": {"weight": 1.0}},
                                               {"model": "rev", "parameters": {"weight": 1.0}})))
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"
    assert not torch.equal(plain[q], ta[q]) and not torch.equal(plain[q], disk[q])  # data and AIM both act
    assert torch.equal(plain[norm], ta[norm]) == (method == "regmean")  # regmean: the fallback (linear)
    # scale: the fallback's tensors get the scaled task vectors too; disk and in place agree
    scaled = recipe.model_copy(update={"models": tuple(m.model_copy(update={"parameters": {"scale": s}})
                                                       for m, s in zip(recipe.models, (2.0, 1.5), strict=True))})
    out2 = materialize_to_disk(scaled, tmp_path / "out2", stats=stats)
    InPlaceMerger(ResidentSources.load(recipe.sources, "base", ["add", "rev"]), live, stats).apply(scaled)
    disk2 = AutoModelForCausalLM.from_pretrained(out2, dtype=torch.float32).state_dict()
    for name, t in live.state_dict().items():
        assert torch.equal(t, disk2[name]), name
    if method == "regmean":
        sd = {m: AutoModelForCausalLM.from_pretrained(recipe.sources[m], dtype=torch.float32).state_dict()[norm]
              for m in ("base", "add", "rev")}
        want = sd["base"] + (2.0 * (sd["add"] - sd["base"]) + 1.5 * (sd["rev"] - sd["base"])) / 2
        torch.testing.assert_close(disk2[norm], want)


def test_model_tasks_give_each_model_its_own_examples(zoo_test, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.stats import calibration_requests
    from evomerge.recipe import DataSpec
    from evomerge.scoring.suite import load_suite

    shared = _recipe(zoo_test)
    own = _recipe(zoo_test, model_tasks={"add": ["add"], "rev": ["rev"]})
    assert own.hash != shared.hash
    # a recipe without the field hashes as before it existed
    assert "model_tasks" not in shared.canonical()["data"] and "model_tasks" in own.canonical()["data"]
    stats, records = recipe_stats(own, own.sources, tmp_path)
    assert stats is not None
    suite, tok = load_suite("builtin:zoo-2"), AutoTokenizer.from_pretrained(zoo_test.base)
    q = "model.layers.0.self_attn.q_proj.weight"
    for m in ("add", "rev"):
        reqs = calibration_requests(suite, tok, DataSpec(suite="builtin:zoo-2", examples=3, tasks=(m,)))
        assert len(reqs) == 3  # this model's task only
        model = AutoModelForCausalLM.from_pretrained(zoo_test.expert(m), dtype=torch.float32)
        want = collect(model, reqs, ("gram",))["gram"][q]
        torch.testing.assert_close(stats.one("gram", q, m), want)
    # only "add" is given its own task: "rev" reads the shared set (both tasks), the cache keeps both files
    half = _recipe(zoo_test, model_tasks={"add": ["add"]})
    shared_stats, _ = recipe_stats(shared, shared.sources, tmp_path)
    mixed, recs = recipe_stats(half, half.sources, tmp_path)
    assert torch.equal(mixed.one("gram", q, "add"), stats.one("gram", q, "add"))
    assert torch.equal(mixed.one("gram", q, "rev"), shared_stats.one("gram", q, "rev"))
    assert not torch.equal(mixed.one("gram", q, "rev"), stats.one("gram", q, "rev"))
    assert [r.computed for r in recs] == [False, False]
    with pytest.raises(ConfigError, match=r"data.model_tasks.add: \['sort'\] are not tasks of builtin:zoo-2"):
        recipe_stats(_recipe(zoo_test, model_tasks={"add": ["sort"]}), shared.sources, tmp_path)
    with pytest.raises(ValueError, match=r"data.model_tasks: \['nope'\] are not models of the recipe"):
        _recipe(zoo_test, model_tasks={"nope": ["add"]})
    with pytest.raises(ValueError, match="model_tasks.add: empty list"):
        _recipe(zoo_test, model_tasks={"add": []})


def test_informed_merge_bad_input(zoo_test, tmp_path: Path) -> None:
    from evomerge.merge.materialize import materialize_state_dict
    from evomerge.mergekit_compat import to_mergekit_yaml

    recipe = _recipe(zoo_test)
    with pytest.raises(ConfigError, match="reads calibration statistics"):
        materialize_state_dict(recipe)
    with pytest.raises(ConfigError, match="needs statistics"):
        recipe_stats(recipe.model_copy(update={"data": None}), recipe.sources, tmp_path)
    bad = recipe.model_copy(update={"data": recipe.data.model_copy(update={"fallback": "nope"})})
    with pytest.raises(ConfigError, match="data.fallback"):
        materialize_state_dict(bad, stats=MergeStats({}))
    with pytest.raises(ConfigError, match="no mergekit equivalent"):
        to_mergekit_yaml(recipe)
    aim = Recipe(method="task_arithmetic", base_model="base", models=({"model": "add"},),
                 data={"suite": "builtin:zoo", "aim": 0.3})
    with pytest.raises(ConfigError, match="AIM"):
        to_mergekit_yaml(aim)
    with pytest.raises(ValueError, match="aim"):
        Recipe(method="ties", models=({"model": "a"},), data={"suite": "x", "aim": 2})
    assert Recipe(method="ties", models=({"model": "a"},)).hash == Recipe(method="ties", models=({"model": "a"},),
                                                                          data=None).hash


def test_cli_merge_computes_then_loads_statistics(zoo_test, tmp_path: Path) -> None:
    from evomerge.cli import app

    recipe = _recipe(zoo_test)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    runner = CliRunner()
    first = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "m1")])
    assert first.exit_code == 0, first.output
    assert first.output.count("statistics computed") == 2 and (tmp_path / "m1.stats").is_dir()
    second = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "m2"),
                                 "--stats-dir", str(tmp_path / "m1.stats")])
    assert second.exit_code == 0 and second.output.count("statistics loaded") == 2, second.output
    a = (tmp_path / "m1" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "m2" / "model.safetensors").read_bytes()
    path.write_text(recipe.model_copy(update={"data": None}).to_yaml())
    bad = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "m3")])
    assert bad.exit_code == 2 and "data" in bad.output


def test_memory_plan_counts_the_statistics_of_7b_shapes() -> None:
    from dataclasses import replace

    from evomerge.driver import plan as memory

    shapes = memory.shapes_from("llama-7b")
    setup = memory.Setup(n_deltas=2, dtype=torch.bfloat16, orders=False, scorer="hf", device="cuda", workers=1,
                         workers_per_device=1, workers_per_host=1, stats_kinds=("gram",))
    mem = memory.Memory(device_free=80 * 2**30, device_total=80 * 2**30)
    parts = {p.name: p.bytes for p in memory.compute(shapes, setup, mem).parts}
    # per layer: q, k, v, o, gate, up have 4096 inputs (under the bound), down_proj 11008 (over it)
    assert parts["calibration statistics"] == 3 * 32 * 6 * 4096**2 * 4
    fisher = memory.compute(shapes, replace(setup, stats_kinds=("fisher",)), mem).parts
    assert {p.name: p.bytes for p in fisher}["calibration statistics"] == 3 * shapes.entries * 4
    none = {p.name for p in memory.compute(shapes, replace(setup, stats_kinds=()), mem).parts}
    assert "calibration statistics" not in none
