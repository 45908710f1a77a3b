"""Backbone: loading, adapters, soft-prompt text encoder, freezing, weights formats and errors.

Fast tests use a tiny open_clip config registered from a temporary directory (random weights);
the real ViT-B-32 / ViT-L-14 architectures are exercised in test_backbone_real_archs.py.
"""

from __future__ import annotations

import json
import math
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import czsl_bench.backbone as bb
from czsl_bench.hashing import tensors_sha256
from czsl_bench.backbone import (
    Backbone,
    BottleneckAdapter,
    WeightsUnavailableError,
    load_backbone,
    read_checkpoint,
    resolve_device,
    resolve_precision,
)

TINY = "czsl-test-tiny-vit"
TINY_CFG = {
    "embed_dim": 48,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("configs")
    (directory / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(directory / f"{TINY}.json")
    return TINY


@pytest.fixture()
def tiny(tiny_arch) -> Backbone:
    torch.manual_seed(0)
    return load_backbone(tiny_arch, None, device="cpu")


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- shapes, constants, device ----------------------------------------------------------------


def test_shapes_and_constants(tiny):
    assert (tiny.embed_dim, tiny.vision_width, tiny.text_width, tiny.context_length) == (48, 64, 64, 24)
    assert tiny.image_size == 32
    assert tiny.precision == "fp32" and tiny.device.type == "cpu"
    assert math.isclose(float(tiny.logit_scale), 1 / 0.07, rel_tol=1e-6)  # open_clip's random init
    assert not tiny.logit_scale.requires_grad
    feats = tiny.encode_image(images())
    cls, patches = tiny.encode_image_tokens(images())
    assert feats.shape == (2, 48) and cls.shape == (2, 48) and patches.shape == (2, 16, 48)


def test_everything_in_clip_is_frozen(tiny):
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert tiny.trainable_parameters() == []
    unfrozen = tiny.unfreeze("visual.transformer.resblocks.1")
    assert unfrozen and all(p.requires_grad for p in unfrozen)
    assert {id(p) for p in tiny.trainable_parameters()} == {id(p) for p in unfrozen}
    with pytest.raises(ValueError, match="no CLIP parameter"):
        tiny.unfreeze("visual.nonexistent")


def test_train_mode_switches_adapters_only(tiny):
    tiny.add_adapters()
    tiny.train()
    assert tiny.adapters.training and not tiny.model.training
    tiny.eval()
    assert not tiny.adapters.training


def test_resolve_device_and_precision():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("bf16", torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_autocast_is_a_noop_on_cpu_and_bf16_on_cuda(tiny):
    with tiny.autocast():
        assert tiny.encode_image(images()).dtype == torch.float32
    tiny.precision = "bf16"  # what load_backbone picks on a GPU (not available on the test machine)
    ctx = tiny.autocast()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())  # weights stay fp32 (AMP)


# ---- adapters ---------------------------------------------------------------------------------


def test_zero_init_adapters_are_bit_identical(tiny):
    x = images()
    with torch.no_grad():
        plain = tiny.model.encode_image(x)
        params = tiny.add_adapters()
        assert len(tiny.adapters) == 2 * 2 and all(p.requires_grad for p in params)
        adapted = tiny.encode_image(x)
        cls, _ = tiny.encode_image_tokens(x)
    assert torch.equal(adapted, plain)
    assert torch.equal(cls, plain)
    tiny.train()  # dropout active: still exactly zero, the up-projection is zero
    with torch.no_grad():
        assert torch.equal(tiny.encode_image(x), plain)


def test_adapter_init_and_parameter_count():
    a = BottleneckAdapter(1024, 64, 0.1, 0.1)
    # spec-cluspro §1.1: 132,160 parameters per adapter on ViT-L/14 (width 1024)
    assert sum(p.numel() for p in a.parameters()) == 132_160
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    assert torch.count_nonzero(a.down.bias) == 0
    bound = 1 / math.sqrt(1024)  # kaiming-uniform with a = sqrt(5) on fan_in 1024
    assert a.down.weight.abs().max() <= bound and a.down.weight.std() > bound / 3


def test_adapted_block_matches_the_spec_equation(tiny):
    """x <- x + MHA(LN1(x)) + A_i(x); x <- x + MLP(LN2(x)) + A_{L+i}(x), adapters read un-normalised input."""
    torch.manual_seed(1)
    tiny.add_adapters(bottleneck=8, dropout=0.0, scale=0.5)
    for a in tiny.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.1)
        torch.nn.init.normal_(a.up.bias, std=0.1)
    blk = tiny.visual.transformer.resblocks[0]
    x = torch.randn(2, 17, 64)

    def adapter(a, v):
        return (torch.relu(v @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias) * 0.5

    def mha(v):
        return blk.attn(v, v, v, need_weights=False)[0]

    h = x + mha(blk.ln_1(x)) + adapter(tiny.adapters[0], x)
    expected = h + blk.mlp(blk.ln_2(h)) + adapter(tiny.adapters[2], h)
    got = bb._adapted_block(blk, x, tiny.adapters[0], tiny.adapters[2])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # ... and trained adapters do change the features
    with torch.no_grad():
        assert not torch.allclose(tiny.encode_image(images()), tiny.encode_image(images(), adapters=False))


def test_adapters_on_a_subset_of_blocks_touch_only_those_blocks(tiny):
    """CAMS adapts only its last M blocks: add_adapters(blocks=...) puts the two adapters there."""
    assert tiny.vision_layers == 2
    params = tiny.add_adapters(bottleneck=8, dropout=0.0, blocks=[-1])
    assert tiny.adapter_blocks == (1,) and len(tiny.adapters) == 2 and len(params) == 2 * 4
    for a in tiny.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.1)
    x = images()
    with torch.no_grad():
        _, plain = tiny.encode_image_blocks(x, [0, 1], adapters=False)
        cls, adapted = tiny.encode_image_blocks(x, [0, 1])
        blk = tiny.visual.transformer.resblocks[1]
        expected = bb._adapted_block(blk, plain[0], tiny.adapters[0], tiny.adapters[1])
    assert torch.equal(adapted[0], plain[0])  # block 0 has no adapter
    torch.testing.assert_close(adapted[1], expected)
    assert torch.equal(cls, tiny.encode_image(x))
    with pytest.raises(ValueError, match="already added"):
        tiny.add_adapters()


def test_adapter_blocks_out_of_range_is_one_line(tiny):
    with pytest.raises(ValueError, match=r"adapter block\(s\) \[2\] out of range: .* has 2 visual blocks"):
        tiny.add_adapters(blocks=[0, 2])
    with pytest.raises(ValueError, match=r"block\(s\) \[-3\] out of range"):
        tiny.encode_image_blocks(images(), [-3])


def test_block_outputs_are_the_residual_stream_before_ln_post(tiny):
    x = images()
    with torch.no_grad():
        cls, hidden = tiny.encode_image_blocks(x, [-1, 0])
        assert sorted(hidden) == [0, 1] and hidden[1].shape == (2, 17, 64)
        last = tiny._visual_tokens(x, adapters=True)
        first = tiny.visual.transformer.resblocks[0](tiny.visual._embeds(x))
    assert torch.equal(hidden[1], last)
    torch.testing.assert_close(hidden[0], first)
    pooled = tiny.visual.ln_post(last[:, 0]) @ tiny.visual.proj
    torch.testing.assert_close(cls, pooled)


def test_backward_reaches_only_adapters_and_soft_tokens(tiny):
    tiny.add_adapters()
    for a in tiny.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.02)  # a trained-looking adapter so every grad is non-zero
    ids = tiny.tokenize(["a photo of x x"] * 3, context_length=8)
    ctx = torch.nn.Parameter(tiny.token_embedding(ids[:1, 1:4])[0].detach().clone())
    vocab = torch.nn.Parameter(torch.randn(6, tiny.text_width) * 0.02)
    emb, eot = tiny.soft_prompt_embeddings(ids, context=ctx, slots={-2: vocab[:3], -1: vocab[3:]})
    text = torch.nn.functional.normalize(tiny.encode_text_embeddings(emb, eot), dim=-1)
    img = torch.nn.functional.normalize(tiny.encode_image(images()), dim=-1)
    loss = torch.nn.functional.cross_entropy(tiny.logit_scale * img @ text.T, torch.tensor([0, 2]))
    loss.backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert vocab.grad is not None and vocab.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for a in tiny.adapters for p in a.parameters())
    assert all(p.grad is None for p in tiny.model.parameters())


def test_adapters_refuse_a_second_call_and_grad_checkpointing_matches(tiny):
    tiny.add_adapters()
    with pytest.raises(ValueError, match="already"):
        tiny.add_adapters()
    for a in tiny.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.02)
    x = images()
    plain = tiny.encode_image(x)
    plain.sum().backward()
    g0 = tiny.adapters[0].up.weight.grad.clone()
    tiny.adapters.zero_grad()
    tiny.set_grad_checkpointing(True)
    ckpt = tiny.encode_image(x)
    ckpt.sum().backward()
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close(tiny.adapters[0].up.weight.grad, g0)


# ---- text -------------------------------------------------------------------------------------


TEXTS = ["a photo of sliced apple", "a photo of ancient building", "broken", "a photo of a cat on a mat"]


def test_encode_text_matches_open_clip_bitwise(tiny):
    ids = tiny.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(tiny.encode_text(TEXTS), tiny.model.encode_text(ids))


def test_truncated_context_gives_the_same_eot_feature(tiny):
    with torch.no_grad():
        full = tiny.encode_text(TEXTS)
        short = tiny.encode_text(TEXTS, context_length=12)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_tokenize_truncation_keeps_sot_and_eot(tiny):
    ids = tiny.tokenize(["a photo of a very long prompt that does not fit into eight tokens"], context_length=8)
    tok = tiny.tokenizer
    assert ids.shape == (1, 8)
    assert int(ids[0, 0]) == tok.sot_token_id and int(ids[0, -1]) == tok.eot_token_id
    assert int(tiny.eot_index(ids)[0]) == 7
    with pytest.raises(ValueError, match="out of range"):
        tiny.tokenize(["x"], context_length=tiny.context_length + 1)


def test_soft_prompt_with_the_real_embeddings_reproduces_the_plain_prompt(tiny):
    """Context = embeddings of "a photo of", slots = embeddings of two one-token words -> the text."""
    template = tiny.tokenize(["a photo of x x"] * 2, context_length=10)
    real = tiny.tokenize(["a photo of red apple", "a photo of old car"], context_length=10)
    assert torch.equal(tiny.eot_index(real), tiny.eot_index(template))  # each word is one BPE token
    eot = int(tiny.eot_index(real)[0])
    ctx = tiny.token_embedding(real[0, 1:4])
    attr = tiny.token_embedding(real[:, eot - 2])
    obj = tiny.token_embedding(real[:, eot - 1])
    with torch.no_grad():
        emb, eot_idx = tiny.soft_prompt_embeddings(template, context=ctx, slots={-2: attr, -1: obj})
        assert torch.equal(emb, tiny.token_embedding(real))
        assert torch.equal(tiny.encode_text_embeddings(emb, eot_idx), tiny.encode_text(["a photo of red apple", "a photo of old car"], context_length=10))


def test_soft_prompt_rejects_bad_slots(tiny):
    ids = tiny.tokenize(["a photo of x x"] * 2, context_length=8)
    with pytest.raises(ValueError, match="expected"):
        tiny.soft_prompt_embeddings(ids, slots={-1: torch.zeros(3, tiny.text_width)})
    with pytest.raises(ValueError, match="outside"):
        tiny.soft_prompt_embeddings(ids, slots={-7: torch.zeros(2, tiny.text_width)})
    with pytest.raises(ValueError, match="eot_index"):
        tiny.encode_text_embeddings(tiny.token_embedding(ids), torch.tensor([1, 2, 3]))


def test_word_embedding_is_the_mean_of_bpe_tokens(tiny):
    ids = tiny.tokenize(["traffic_light"])
    eot = int(tiny.eot_index(ids)[0])
    assert eot > 2  # several BPE tokens
    expected = tiny.token_embedding(ids[0, 1:eot]).mean(0)
    torch.testing.assert_close(tiny.word_embedding(["traffic_light"])[0], expected)


# ---- weights: formats, hashing, errors --------------------------------------------------------


def _state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def test_weights_hash_is_format_independent(tiny_arch, tiny, tmp_path):
    state = _state(tiny)
    want = tiny.weights_hash
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    openai_sd = dict(state)
    openai_sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(24), vocab_size=torch.tensor(49408))
    openai_sd = {k: (v.half() if v.is_floating_point() else v) for k, v in openai_sd.items()}  # OpenAI ships fp16
    torch.save(openai_sd, tmp_path / "openai.bin")
    for name in ("w.safetensors", "w.pt", "ckpt.pt"):
        loaded = load_backbone(tiny_arch, str(tmp_path / name), device="cpu")
        assert loaded.weights_hash == want, name
        assert loaded.weights_source == str(tmp_path / name)
    fp16 = load_backbone(tiny_arch, str(tmp_path / "openai.bin"), device="cpu")
    assert read_checkpoint(tmp_path / "openai.bin")[1] == "openai"
    ref = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    assert fp16.weights_hash == tensors_sha256(ref)


def test_weights_hash_changes_with_one_weight(tiny):
    before = tiny.weights_hash
    changed = load_backbone(tiny.arch, None, device="cpu")
    changed.model.load_state_dict(tiny.model.state_dict())
    assert changed.weights_hash == before
    changed = load_backbone(tiny.arch, None, device="cpu")
    changed.model.load_state_dict(tiny.model.state_dict())
    with torch.no_grad():
        changed.model.visual.proj[0, 0] += 1e-3
    changed._weights_hash = None
    assert changed.weights_hash != before


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_torchscript_archive_is_read_without_running_it(tiny_arch, tiny, tmp_path):
    model = tiny.model
    traced = torch.jit.trace_module(model, {"encode_image": (images(1),)})
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    state, fmt = read_checkpoint(tmp_path / "ViT-tiny.pt")
    assert fmt == "openai-jit"
    loaded = load_backbone(tiny_arch, str(tmp_path / "ViT-tiny.pt"), device="cpu")
    assert loaded.weights_hash == tiny.weights_hash


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pickles_with_code_are_refused(tiny_arch, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(ValueError, match="cannot read checkpoint") as info:
        load_backbone(tiny_arch, str(path), device="cpu")
    assert "\n" not in str(info.value)
    assert "this must never run" not in capsys.readouterr().out


def test_checkpoint_for_another_arch_is_one_clear_line(tiny, tmp_path):
    state = _state(tiny)
    del state["visual.proj"]
    state["visual.conv1.weight"] = torch.zeros(64, 3, 16, 16)  # a patch-16 model
    state["visual.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit architecture .*1 missing .*1 unexpected .*1 with another shape.*--backbone") as info:
        load_backbone(tiny.arch, str(tmp_path / "b.safetensors"), device="cpu")
    assert "\n" not in str(info.value)


def test_openai_checkpoint_needs_a_quickgelu_arch(tiny, tmp_path):
    cfg = dict(TINY_CFG, quick_gelu=False)
    (tmp_path / "czsl-test-gelu.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "czsl-test-gelu.json")
    sd = _state(tiny)
    sd["input_resolution"] = torch.tensor(32)
    torch.save(sd, tmp_path / "openai.pt")
    with pytest.raises(ValueError, match="QuickGELU.*-quickgelu"):
        load_backbone("czsl-test-gelu", str(tmp_path / "openai.pt"), device="cpu")
    with pytest.raises(ValueError, match="use --backbone ViT-L-14-quickgelu"):
        load_backbone("ViT-L-14", "openai", device="cpu")


def test_missing_file_and_unknown_tag(tiny_arch):
    with pytest.raises(WeightsUnavailableError, match=r"neither a file nor a known tag.*--pretrained /path/to/file"):
        load_backbone(tiny_arch, "/nonexistent/weights.pt", device="cpu")
    with pytest.raises(ValueError, match="unknown architecture"):
        load_backbone("ViT-Q-99", None, device="cpu")


def test_offline_download_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(bb, "_cached_hub_file", lambda pcfg, cache_dir: None)
    monkeypatch.setattr(bb, "_hub_reachable", lambda host="huggingface.co": False)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("ViT-B-32-quickgelu", "openai", device="cpu")
    msg = str(info.value)
    assert "'openai'" in msg and "ViT-B-32-quickgelu" in msg and "--pretrained /path/to/file" in msg
    assert "\n" not in msg and isinstance(info.value, OSError)


def test_hub_client_errors_become_one_line(monkeypatch):
    def broken(cfg, cache_dir=None):
        raise RuntimeError("HTTPSConnectionPool: Max retries exceeded\nTraceback ...")

    monkeypatch.setattr(bb, "_cached_hub_file", lambda pcfg, cache_dir: None)
    monkeypatch.setattr(bb, "_hub_reachable", lambda host="huggingface.co": True)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", broken)
    with pytest.raises(WeightsUnavailableError, match=r"Max retries exceeded\);.*--pretrained") as info:
        load_backbone("ViT-B-32-quickgelu", "openai", device="cpu")
    assert "\n" not in str(info.value)


def test_packaged_tag_resolves_to_safetensors(tiny, tmp_path, monkeypatch):
    (tmp_path / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    monkeypatch.setattr(bb, "packaged_backbone_dir", lambda: tmp_path)
    with pytest.raises(WeightsUnavailableError, match="packaged weights 'synthetic'"):
        load_backbone(TINY, "synthetic", device="cpu")
    save_file(_state(tiny), str(tmp_path / f"{TINY}-synthetic.safetensors"))
    loaded = load_backbone(TINY, "synthetic", device="cpu")
    assert loaded.weights_hash == tiny.weights_hash
    assert loaded.weights_source == f"synthetic ({TINY}-synthetic.safetensors)"


def test_preprocess_matches_the_repos_eval_transform(tiny):
    d = tiny.describe_preprocess()
    assert d["interpolation"] == "bicubic" and d["resize_mode"] == "shortest"
    assert d["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert d["std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    from PIL import Image

    out = tiny.preprocess_eval(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    assert json.dumps(d)  # JSON-able for cache keys


def test_the_packaged_tiny_config_is_registered():
    """czsl-tiny-vit ships as an open_clip JSON config in czsl_bench/data/backbones/."""
    if not (bb.packaged_backbone_dir() / "czsl-tiny-vit.json").is_file():
        pytest.skip("czsl-tiny-vit.json is not packaged in this checkout")
    tiny = load_backbone("czsl-tiny-vit", None, device="cpu")
    cfg = json.loads((bb.packaged_backbone_dir() / "czsl-tiny-vit.json").read_text())
    assert tiny.embed_dim == cfg["embed_dim"] and tiny.image_size == cfg["vision_cfg"]["image_size"]
    with torch.no_grad():
        assert tiny.encode_image(torch.zeros(1, 3, tiny.image_size, tiny.image_size)).shape == (1, cfg["embed_dim"])
    weights = bb._packaged_weights("czsl-tiny-vit", "synthetic")
    if weights is not None:  # once the pretrained tiny model is committed, the tag loads it
        trained = load_backbone("czsl-tiny-vit", "synthetic", device="cpu")
        assert trained.weights_source == f"synthetic ({weights.name})"
        assert trained.weights_hash != tiny.weights_hash


def test_hub_tag_path_uses_the_cached_file_and_the_tag_preprocessing(tiny, tmp_path, monkeypatch):
    save_file(_state(tiny), str(tmp_path / "open_clip_model.safetensors"))
    fake = {"hf_hub": "org/model/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    real_cfg = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: fake if tag == "fake" else real_cfg(arch, tag))
    monkeypatch.setattr(bb, "_cached_hub_file", lambda pcfg, cache_dir: str(tmp_path / "open_clip_model.safetensors"))
    monkeypatch.setattr(bb, "_hub_reachable", lambda host="huggingface.co": pytest.fail("network touched"))
    loaded = load_backbone(tiny.arch, "fake", device="cpu")
    assert loaded.weights_source == "fake (open_clip_model.safetensors)"
    assert loaded.weights_hash == tiny.weights_hash
    assert loaded.describe_preprocess()["mean"] == [0.5, 0.5, 0.5]
    assert loaded.describe_preprocess()["std"] == [0.25, 0.25, 0.25]

