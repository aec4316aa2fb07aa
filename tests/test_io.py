"""Model folder I/O: lazy reading, refusal of bad folders, mergeability preflight, tensor roles, writing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import evomerge.io.folder as folder_module
from evomerge.errors import ConfigError, SourceError, SourceMismatchError
from evomerge.io import (
    ModelFolder,
    ModelWriter,
    TensorRole,
    check_mergeable,
    layer_index,
    layer_prefix,
    rename_layer,
    split_layer,
    tensor_role,
)
from evomerge.testing.tokenizer import build_tokenizer

VOCAB = len(build_tokenizer())
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _save_llama(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    config = LlamaConfig(**{**TINY, "vocab_size": VOCAB, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def sharded_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama rewritten by ModelWriter into exactly three shards."""
    out = tmp_path_factory.mktemp("out") / "sharded"
    with ModelFolder.open(llama_dir) as src, ModelWriter(out, max_shard_bytes=40_000) as writer:
        for name in src.tensor_names:
            writer.add(name, src.get(name))
        writer.finish(
            src.config, tokenizer_from=llama_dir, generation_config_from=llama_dir, model_card="# tiny\n"
        )
    return out


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


# -- reading ---------------------------------------------------------------------------------------------


def test_three_shard_output_reloads_with_identical_logits(llama_dir: Path, sharded_dir: Path) -> None:
    shards = sorted(sharded_dir.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 40]])
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(sharded_dir).eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, reloaded(ids).logits)
    with ModelFolder.open(llama_dir) as a, ModelFolder.open(sharded_dir) as b:
        assert sorted(a.tensor_names) == sorted(b.tensor_names)
        assert len(b.shards) == 3 and a.nbytes == b.nbytes
        for name in a.tensor_names:
            assert torch.equal(a.get(name), b.get(name)), name


def test_written_folder_has_config_tokenizer_card_and_modes(llama_dir: Path, sharded_dir: Path) -> None:
    names = {p.name for p in sharded_dir.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert (sharded_dir / "README.md").read_text() == "# tiny\n"
    assert json.loads((sharded_dir / "config.json").read_text()) == json.loads(
        (llama_dir / "config.json").read_text()
    )
    for path in sharded_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert stat.S_IMODE(sharded_dir.stat().st_mode) == 0o755
    with safe_open(str(sharded_dir / "model-00001-of-00003.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert not [p for p in sharded_dir.parent.iterdir() if p.name.startswith(".")]


def test_folder_describes_model_from_headers(llama_dir: Path) -> None:
    with ModelFolder.open(llama_dir) as folder:
        assert folder.architecture == "LlamaForCausalLM" and folder.model_type == "llama"
        assert folder.num_layers == 2 and not folder.tied_embeddings
        assert folder.shape("model.embed_tokens.weight") == (VOCAB, 32)
        assert folder.dtype("model.norm.weight") == torch.float32
        assert folder.nbytes == sum(folder.get(n).numel() * 4 for n in folder.tensor_names)
        assert folder.generation_config is not None and folder.generation_config["bos_token_id"] == 1
        assert llama_dir / "tokenizer.json" in folder.tokenizer_files
        with pytest.raises(SourceError, match="no tensor named 'nope'"):
            folder.shape("nope")


def test_reads_lazily_and_reuses_handles(sharded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = folder_module.safe_open

    def counting(path: str, *args: object, **kwargs: object) -> object:
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder_module, "safe_open", counting)
    folder = ModelFolder.open(sharded_dir)
    assert opened == []
    last = folder.tensor_names[-1]
    folder.get(last)
    folder.get(last)
    assert opened == [folder.info(last).file.name]
    folder.close()
    folder.get(last)
    assert len(opened) == 2


def test_get_converts_and_copies(llama_dir: Path) -> None:
    with ModelFolder.open(llama_dir) as folder:
        half = folder.get("model.norm.weight", dtype=torch.float16)
        assert half.dtype == torch.float16
        first = folder.get("model.norm.weight")
        first.add_(5.0)
        assert torch.equal(folder.get("model.norm.weight"), first - 5.0)


def test_tied_embeddings_detected(tmp_path: Path) -> None:
    tied = _save_llama(tmp_path / "tied", tie_word_embeddings=True)
    with ModelFolder.open(tied) as folder:
        assert folder.tied_embeddings and "lm_head.weight" not in folder


def test_pickle_weights_refused(tmp_path: Path, llama_dir: Path) -> None:
    for weights in ("pytorch_model.bin", "consolidated.pth", "model.pt", "last.ckpt"):
        folder = tmp_path / weights.replace(".", "_")
        folder.mkdir()
        (folder / "config.json").write_text((llama_dir / "config.json").read_text())
        torch.save({"w": torch.zeros(2)}, folder / weights)
        with pytest.raises(SourceError, match="safetensors") as info:
            ModelFolder.open(folder)
        assert weights in str(info.value) and "pickle" in str(info.value)


def test_missing_folder_and_config(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        ModelFolder.open(tmp_path / "absent")
    no_config = _copy_folder(llama_dir, tmp_path / "noconfig")
    (no_config / "config.json").unlink()
    with pytest.raises(SourceError, match="config.json"):
        ModelFolder.open(no_config)
    (no_config / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="config.json"):
        ModelFolder.open(no_config)


def test_truncated_and_corrupt_files_refused(tmp_path: Path, llama_dir: Path) -> None:
    folder = _copy_folder(llama_dir, tmp_path / "broken")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated") as info:
        ModelFolder.open(folder)
    assert "model.safetensors" in str(info.value)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"garbage-not-json" + data[200:400])
    with pytest.raises(SourceError, match="corrupt") as info:
        ModelFolder.open(folder)
    assert "model.safetensors" in str(info.value)
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(SourceError, match="model.safetensors"):
        ModelFolder.open(folder)


def test_missing_shard_and_missing_tensor_refused(tmp_path: Path, sharded_dir: Path) -> None:
    folder = _copy_folder(sharded_dir, tmp_path / "partial")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(SourceError, match="model-00002-of-00003.safetensors.*does not exist"):
        ModelFolder.open(folder)
    folder = _copy_folder(sharded_dir, tmp_path / "lying_index")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceError, match="model.layers.9.mlp.up_proj.weight") as info:
        ModelFolder.open(folder)
    assert "model-00001-of-00003.safetensors" in str(info.value)


# -- mergeability ------------------------------------------------------------------------------------------


def _fake_folder(
    path: Path, config: dict[str, object], shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype] | None = None,
) -> ModelFolder:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    dtypes = dtypes or {}
    tensors = {n: torch.zeros(s, dtype=dtypes.get(n, torch.float32)) for n, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"))
    return ModelFolder.open(path)


LLAMA_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
LLAMA_SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.mlp.up_proj.weight": (8, 4),
    "model.norm.weight": (4,),
    "lm_head.weight": (10, 4),
}


def test_check_mergeable_passes_without_reading_data(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = _save_llama(tmp_path / "other", seed=1)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(folder_module, "safe_open", refuse)
    check_mergeable({"a": ModelFolder.open(llama_dir), "b": ModelFolder.open(other)})


def test_check_mergeable_names_vocab_mismatch(tmp_path: Path) -> None:
    a = _fake_folder(tmp_path / "a", LLAMA_CFG, LLAMA_SHAPES)
    b = _fake_folder(
        tmp_path / "b",
        LLAMA_CFG,
        {**LLAMA_SHAPES, "model.embed_tokens.weight": (12, 4), "lm_head.weight": (12, 4)},
    )
    with pytest.raises(SourceMismatchError) as info:
        check_mergeable({"base": a, "tuned": b})
    message = str(info.value)
    assert "model.embed_tokens.weight: 10 rows in 'base' vs 12 in 'tuned'" in message
    assert "tokenizer" in message and "resize" in message and "1 more" in message


def test_check_mergeable_names_other_shape_mismatch(tmp_path: Path) -> None:
    a = _fake_folder(tmp_path / "a", LLAMA_CFG, LLAMA_SHAPES)
    b = _fake_folder(
        tmp_path / "b", LLAMA_CFG, {**LLAMA_SHAPES, "model.layers.0.mlp.up_proj.weight": (16, 4)}
    )
    with pytest.raises(
        SourceMismatchError, match=r"up_proj.weight: shape \(8, 4\) in 'a' vs \(16, 4\) in 'b'"
    ):
        check_mergeable({"a": a, "b": b})


def test_check_mergeable_refuses_integer_tensors_among_float_ones(tmp_path: Path) -> None:
    up, norm = "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
    base = _fake_folder(tmp_path / "base", LLAMA_CFG, LLAMA_SHAPES)
    half = _fake_folder(tmp_path / "half", LLAMA_CFG, LLAMA_SHAPES, {up: torch.float16})
    check_mergeable({"base": base, "half": half})  # float dtypes are cast when merged
    quant = _fake_folder(tmp_path / "quant", LLAMA_CFG, LLAMA_SHAPES, {up: torch.int8, norm: torch.uint8})
    for folders in ({"base": base, "quant": quant}, {"quant": quant, "base": base}):
        with pytest.raises(SourceMismatchError) as info:
            check_mergeable(folders)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'quant'}: tensor {up!r} of 'quant' is stored as torch.int8")
        assert "'base' stores it as torch.float32 (and 1 more tensor" in message


def test_check_mergeable_explains_tied_lm_head(tmp_path: Path) -> None:
    untied = _fake_folder(tmp_path / "a", {**LLAMA_CFG, "tie_word_embeddings": False}, LLAMA_SHAPES)
    shapes = {n: s for n, s in LLAMA_SHAPES.items() if n != "lm_head.weight"}
    tied = _fake_folder(tmp_path / "b", {**LLAMA_CFG, "tie_word_embeddings": True}, shapes)
    with pytest.raises(SourceMismatchError, match="lm_head.weight") as info:
        check_mergeable({"untied": untied, "tied": tied})
    assert "tie_word_embeddings" in str(info.value) and "'tied'" in str(info.value)


def test_check_mergeable_refuses_other_family_and_depth(tmp_path: Path) -> None:
    a = _fake_folder(tmp_path / "a", LLAMA_CFG, LLAMA_SHAPES)
    qwen = _fake_folder(
        tmp_path / "q", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, LLAMA_SHAPES
    )
    with pytest.raises(SourceMismatchError, match="'a' is a LlamaForCausalLM.*'q' is a Qwen2ForCausalLM"):
        check_mergeable({"a": a, "q": qwen})
    deeper = _fake_folder(
        tmp_path / "d",
        {**LLAMA_CFG, "num_hidden_layers": 2},
        {**LLAMA_SHAPES, "model.layers.1.mlp.up_proj.weight": (8, 4)},
    )
    with pytest.raises(SourceMismatchError, match="'a' has 1 layers but 'd' has 2"):
        check_mergeable({"a": a, "d": deeper})


# -- tensor roles ------------------------------------------------------------------------------------------

_DECODER = dict(TINY, vocab_size=64)
ARCHS = {
    "llama": (LlamaConfig(**_DECODER), {"model.layers.1.self_attn.o_proj.weight": TensorRole(1, "attn", "o")}),
    "mistral": (MistralConfig(**_DECODER), {"model.layers.0.mlp.down_proj.weight": TensorRole(0, "mlp", "down")}),
    "qwen2": (Qwen2Config(**_DECODER), {"model.layers.1.self_attn.k_proj.bias": TensorRole(1, "attn", "k")}),
    "qwen3": (Qwen3Config(**_DECODER), {"model.layers.0.self_attn.q_norm.weight": TensorRole(0, "norm")}),
    "gemma": (GemmaConfig(head_dim=8, **_DECODER), {"model.norm.weight": TensorRole(None, "norm")}),
    "gemma2": (
        Gemma2Config(head_dim=8, **_DECODER),
        {"model.layers.1.pre_feedforward_layernorm.weight": TensorRole(1, "norm")},
    ),
    "phi3": (
        Phi3Config(**_DECODER),
        {
            "model.layers.1.self_attn.qkv_proj.weight": TensorRole(1, "attn"),  # fused: no projection
            "model.layers.0.mlp.gate_up_proj.weight": TensorRole(0, "mlp"),
            "model.rotary_emb.inv_freq": TensorRole(None, "other"),
        },
    ),
    "gpt2": (
        GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
        {
            "transformer.wte.weight": TensorRole(None, "embed"),
            "transformer.wpe.weight": TensorRole(None, "embed"),
            "transformer.h.1.attn.c_attn.weight": TensorRole(1, "attn"),
            "transformer.h.0.attn.c_proj.bias": TensorRole(0, "attn", "o"),
            "transformer.h.0.mlp.c_fc.weight": TensorRole(0, "mlp", "up"),
            "transformer.h.1.mlp.c_proj.weight": TensorRole(1, "mlp", "down"),
            "transformer.h.0.ln_1.weight": TensorRole(0, "norm"),
            "transformer.h.1.ln_2.bias": TensorRole(1, "norm"),
            "transformer.ln_f.weight": TensorRole(None, "norm"),
        },
    ),
}


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_tensor_role_covers_real_names(model_type: str) -> None:
    config, expected = ARCHS[model_type]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = list(model.state_dict()) + [n for n, _ in model.named_buffers()]
    assert set(expected) <= set(names)
    for name, role in expected.items():
        assert tensor_role(name, model_type) == role, name
    roles = {name: tensor_role(name, model_type) for name in names}
    for name in params:
        assert roles[name].kind != "other", name
    for layer in range(2):
        assert {r.kind for r in roles.values() if r.layer == layer} == {"attn", "mlp", "norm"}
    assert {r.layer for r in roles.values()} == {None, 0, 1}
    outside = {r.kind for n, r in roles.items() if r.layer is None and n in params}
    assert outside == {"embed", "norm", "lm_head"}


def test_tensor_role_generic_and_family_rules() -> None:
    assert tensor_role("h.3.attn.bias", "gpt2") == TensorRole(3, "other")
    assert tensor_role("h.3.attn.bias") == TensorRole(3, "attn")
    assert tensor_role("blocks.4.ffn.fc1.weight") == TensorRole(4, "mlp")
    assert tensor_role("model.layers.2.block_sparse_moe.experts.7.w1.weight") == TensorRole(2, "mlp", "gate")
    assert tensor_role("gpt_neox.embed_in.weight") == TensorRole(None, "embed")
    assert tensor_role("embed_out.weight") == TensorRole(None, "lm_head")
    assert tensor_role("something.else") == TensorRole(None, "other")


def test_layer_name_helpers() -> None:
    name = "model.layers.3.block_sparse_moe.experts.7.w1.weight"
    assert split_layer(name) == ("model.layers", 3, "block_sparse_moe.experts.7.w1.weight")
    assert layer_prefix(name) == "model.layers.3" and layer_index(name) == 3
    assert rename_layer(name, 12) == "model.layers.12.block_sparse_moe.experts.7.w1.weight"
    assert rename_layer("transformer.h.0.ln_1.weight", 11) == "transformer.h.11.ln_1.weight"
    assert layer_prefix("model.norm.weight") is None and layer_index("lm_head.weight") is None
    with pytest.raises(ValueError, match="model.norm.weight"):
        rename_layer("model.norm.weight", 1)
    with pytest.raises(ValueError):
        rename_layer(name, -1)


# -- writing -----------------------------------------------------------------------------------------------


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    with ModelWriter(tmp_path / "one") as writer:
        writer.add("w", torch.arange(6.0).reshape(2, 3))
        out = writer.finish({"model_type": "llama"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with ModelFolder.open(out) as folder:
        assert torch.equal(folder.get("w"), torch.arange(6.0).reshape(2, 3))


def test_writer_streams_shards_and_snapshots_tensors(tmp_path: Path) -> None:
    tensor = torch.ones(100)
    with ModelWriter(tmp_path / "out", max_shard_bytes=400) as writer:
        writer.add("a", tensor)
        tensor.add_(1.0)
        writer.add("b", tensor)
        (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert len(list(partial.glob("*.safetensors"))) == 1
        out = writer.finish({})
    with ModelFolder.open(out) as folder:
        assert torch.equal(folder.get("a"), torch.ones(100)) and torch.equal(
            folder.get("b"), 2 * torch.ones(100)
        )


def test_writer_refuses_nonempty_dir_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        ModelWriter(target)
    writer = ModelWriter(target, overwrite=True)
    writer.add("w", torch.zeros(2))
    assert (target / "keep.txt").exists()
    writer.finish({})
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with ModelWriter(empty) as writer:
        writer.add("w", torch.zeros(2))
        writer.finish({})
    assert (empty / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_no_output(tmp_path: Path, llama_dir: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), ModelWriter(out, max_shard_bytes=100) as writer:
        for i in range(5):
            writer.add(f"t{i}", torch.zeros(30))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    writer = ModelWriter(out)
    writer.add("w", torch.zeros(2))
    with pytest.raises(SourceError, match="no tokenizer files"):
        writer.finish({}, tokenizer_from=tmp_path)
    assert list(tmp_path.iterdir()) == []
