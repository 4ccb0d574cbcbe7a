"""The model path and its files: `~` expansion, a file instead of a folder, damaged *.safetensors."""
import json
import os
import re
import shutil
import struct

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import make_model
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
SMALL = dict(kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=64)


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def weight_file(folder: str) -> str:
    (name,) = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    return os.path.join(folder, name)


def header_len(file: str) -> int:
    with open(file, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.fixture(scope="module")
def good_tokens(qwen3_path, hf_reference):
    return hf_reference(qwen3_path, [1, 2, 3], GREEDY.max_tokens)


def test_tilde_is_expanded(tmp_path, monkeypatch, qwen3_path, good_tokens):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = copy_model(qwen3_path, tmp_path / "models" / "tiny")
    # a tokenizer too: the engine must look for it in the expanded folder as well
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    with LLM("~/models/tiny", **SMALL) as llm:
        assert llm.config.model == folder
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == good_tokens
        assert llm.generate(["hello world"], GREEDY, use_tqdm=False)[0]["token_ids"] == \
            llm.generate([[1, 2]], GREEDY, use_tqdm=False)[0]["token_ids"]


def test_missing_folder_under_tilde_names_both_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    expanded = os.path.join(str(tmp_path), "nowhere")
    with pytest.raises(ValueError, match=f"model folder '~/nowhere' \\({re.escape(expanded)}\\) does not exist"):
        LLM("~/nowhere")


def test_a_file_instead_of_a_folder(qwen3_path):
    file = os.path.join(qwen3_path, "config.json")
    with pytest.raises(ValueError, match=f"model '{re.escape(file)}' is a file, expected a model folder"):
        LLM(file)
    with pytest.raises(ValueError, match="is a file, expected a model folder"):
        LLM(weight_file(qwen3_path))


def damage(file: str, how: str):
    data = open(file, "rb").read()
    n = header_len(file)
    cuts = {"empty": 0, "in-length": 5, "at-length": 8, "in-header": 8 + n // 2, "after-header": 8 + n,
            "in-data": 8 + n + (len(data) - 8 - n) // 2, "last-byte": len(data) - 1}
    if how in cuts:
        data = data[:cuts[how]]
    elif how == "garbage":
        data = os.urandom(len(data))
    elif how == "garbage-header":  # a length that fits, then bytes that are not JSON
        data = data[:8] + b"\xff" * n + data[8 + n:]
    elif how == "huge-length":
        data = struct.pack("<Q", 1 << 62) + data[8:]
    open(file, "wb").write(data)


@pytest.mark.parametrize("how", ["empty", "in-length", "at-length", "in-header", "after-header", "in-data",
                                 "last-byte", "garbage", "garbage-header", "huge-length"])
def test_damaged_weight_file_is_refused(tmp_path, qwen3_path, how):
    folder = copy_model(qwen3_path, tmp_path / "m")
    file = weight_file(folder)
    damage(file, how)
    with pytest.raises(ValueError, match=f"weight file '{re.escape(file)}' is damaged or incomplete .*; "
                                         f"re-download or re-convert the checkpoint"):
        Config(folder)


def rewrite_header(file: str, edit):
    """Replace the JSON header by edit(header), keeping the data bytes (re-padded to 8 bytes like safetensors)."""
    data = open(file, "rb").read()
    n = header_len(file)
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(file, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def first_tensor(header: dict) -> dict:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


@pytest.mark.parametrize("edit, words", [
    (lambda h: first_tensor(h).update(dtype="BF16"),
     r"data_offsets \[0, 131072\] hold 131072 bytes, but shape \[512, 64\] of BF16 needs 65536\)"),
    (lambda h: first_tensor(h).update(shape=[512, 64, 2]),
     r"data_offsets \[0, 131072\] hold 131072 bytes, but shape \[512, 64, 2\] of F32 needs 262144\)"),
    (lambda h: first_tensor(h).update(data_offsets=[5, 1]), r"bad data_offsets \[5, 1\]"),
    (lambda h: first_tensor(h).pop("dtype"), "entry lacks dtype, shape or data_offsets"),
], ids=["dtype-size", "shape", "offsets-reversed", "no-dtype"])
def test_header_that_disagrees_with_itself_is_refused(tmp_path, qwen3_path, edit, words):
    folder = copy_model(qwen3_path, tmp_path / "m")
    file = weight_file(folder)
    rewrite_header(file, edit)
    expected = f"weight file '{re.escape(file)}' is damaged or incomplete \\(tensor 'lm_head.weight': {words}"
    with pytest.raises(ValueError, match=expected):
        Config(folder)


def test_header_rewritten_unchanged_still_loads(tmp_path, qwen3_path, good_tokens):
    """The header rewrite of the test above is itself sound: with no edit the folder loads and runs."""
    folder = copy_model(qwen3_path, tmp_path / "m")
    rewrite_header(weight_file(folder), lambda h: None)
    with LLM(folder, **SMALL) as llm:
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == good_tokens


def test_damaged_file_is_refused_by_llm_and_the_dummy_format_skips_the_check(tmp_path, qwen3_path):
    folder = copy_model(qwen3_path, tmp_path / "m")
    damage(weight_file(folder), "in-data")
    with pytest.raises(ValueError, match="damaged or incomplete"):
        LLM(folder, **SMALL)
    with LLM(folder, load_format="dummy", **SMALL) as llm:  # dummy weights never read the file
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 5


@pytest.mark.parametrize("how", ["in-length", "in-header", "in-data", "garbage-header"])
def test_file_damaged_after_the_check_is_still_named(tmp_path, qwen3_path, how):
    """A file damaged between Config's check and the load: safetensors' own error, re-raised naming the file."""
    from nanovllm.utils.loader import load_model
    folder = copy_model(qwen3_path, tmp_path / "m")
    file = weight_file(folder)
    damage(file, how)
    with pytest.raises(ValueError, match=f"weight file '{re.escape(file)}' is damaged or incomplete"):
        load_model(torch.nn.Linear(1, 1), folder)


def test_a_weight_the_config_does_not_declare_is_refused(tmp_path):
    """A Qwen3 checkpoint with attention biases whose config says attention_bias=false: loading it without them
    would run another model; the error names the weight."""
    path = make_model(tmp_path / "biased", "qwen3", attention_bias=True)
    config = json.loads((tmp_path / "biased" / "config.json").read_text())
    config["attention_bias"] = False
    (tmp_path / "biased" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"_proj\.bias.*attention_bias"):
        LLM(path)


def edit_json(folder: str, name: str, edit) -> None:
    path = os.path.join(folder, name)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("damage, words", [
    (lambda d: open(os.path.join(d, "config.json"), "w").write("{not json"),
     r"config.json of model folder '.*' cannot be read: "),
    (lambda d: edit_json(d, "config.json", lambda c: c.update(max_position_embeddings=0)),
     r"gives max_position_embeddings=0: the model's context length must be an int >= 1"),
    (lambda d: edit_json(d, "config.json", lambda c: c.update(hidden_size=2 * c["hidden_size"],
                                                             head_dim=c.get("head_dim") or 32)),
     r"checkpoint weight '.*' of .*model.safetensors has shape \[.*\], which does not fit the model that "
     r"config.json describes"),
    (lambda d: open(os.path.join(d, "generation_config.json"), "w").write("[1, "),
     r"generation_config.json is not valid JSON"),
    (lambda d: open(os.path.join(d, "generation_config.json"), "w").write('{"temperature": "hot"}'),
     r"generation_config.json sets a sampling default that SamplingParams refuses: temperature must be a number"),
    (lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("{not json"),
     r"the tokenizer files of '.*' cannot be read: "),
])
def test_damaged_model_files_are_named_at_llm(qwen3_path, tmp_path, damage, words):
    """A folder whose config, weights, defaults or tokenizer cannot serve is refused at LLM(), naming the file,
    not at the first generate() (bad sampling defaults failed every generate without sampling_params)."""
    folder = copy_model(qwen3_path, tmp_path / "model")
    damage(folder)
    with pytest.raises(ValueError, match=words):
        LLM(folder, **SMALL)
