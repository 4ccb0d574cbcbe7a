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
     r"checkpoint weight '.*' of .*model.safetensors does not fit the model that config.json describes "
     r"\(.*\): shape \[.*\], expected \[.*\]"),
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


# ---- checkpoints whose tensors do not make the model config.json describes ----------------------------------


def edit_weights(folder: str, edit) -> None:
    """Rewrite the folder's one weight file with edit(state_dict) applied."""
    from safetensors.torch import load_file, save_file
    file = weight_file(folder)
    weights = load_file(file)
    edit(weights)
    save_file(weights, file, metadata={"format": "pt"})


@pytest.mark.parametrize("kind, name", [
    ("qwen3", "model.layers.0.self_attn.q_proj.weight"),
    ("qwen3", "model.layers.1.self_attn.v_proj.weight"),
    ("qwen3", "model.layers.1.mlp.up_proj.weight"),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
])
def test_a_missing_part_of_a_fused_weight_is_named(tmp_path, kind, name):
    """q/k/v and gate/up load into one fused tensor each; one part missing left that slice uninitialised (the
    fused tensor counted as loaded once any part was) and the engine generated from garbage."""
    folder = make_model(tmp_path / "m", kind)
    edit_weights(folder, lambda w: w.pop(name))
    with pytest.raises(ValueError, match=rf"lacks weights for \['{re.escape(name)}'\]"):
        LLM(folder, **SMALL)


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.input_layernorm.weight", [1]),  # copy_ would broadcast these three
    ("model.layers.0.self_attn.o_proj.weight", [64]),
    ("model.layers.0.mlp.up_proj.weight", [1, 64]),
    ("model.embed_tokens.weight", [600, 64]),  # a vocabulary larger than config.json's 512: was cut to 512 rows
    ("lm_head.weight", [600, 64]),
    ("model.layers.1.mlp.down_proj.weight", [64, 256]),
])
def test_a_weight_of_another_shape_is_refused(tmp_path, name, shape):
    """transformers refuses a checkpoint tensor whose shape differs from the model's; so does the engine, also
    where copying would have broadcast it or cut it."""
    folder = make_model(tmp_path / "m", "qwen3")
    edit_weights(folder, lambda w: w.update({name: torch.zeros(shape)}))
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}' .* does not fit the model that config.json "
                                         rf"describes .*: shape \[{', '.join(map(str, shape))}\], expected"):
        LLM(folder, **SMALL)


def test_tensor_parallel_loaders_check_the_whole_shape():
    """Each rank takes its slice of the whole checkpoint tensor; a tensor with extra rows or columns was sliced
    without complaint at tensor_parallel_size=2 (the same folder was refused at 1). Checked per layer, as rank 1
    of 2 would load it."""
    from nanovllm.layers.embed_head import VocabParallelEmbedding
    from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    row = RowParallelLinear(8, 4)
    merged = MergedColumnParallelLinear(4, [6, 6])
    qkv = QKVParallelLinear(4, 2, 4, 2)
    embed = VocabParallelEmbedding(10, 4)
    for layer in (row, merged, qkv, embed):  # rank 1 of 2: half of the split dimension
        layer.tp_size, layer.tp_rank = 2, 1
    row.weight = torch.nn.Parameter(torch.empty(4, 4), requires_grad=False)
    merged.weight = torch.nn.Parameter(torch.empty(6, 4), requires_grad=False)
    qkv.num_heads, qkv.num_kv_heads = 2, 1
    qkv.weight = torch.nn.Parameter(torch.empty(8, 4), requires_grad=False)
    embed.weight = torch.nn.Parameter(torch.empty(5, 4), requires_grad=False)
    whole = torch.arange(32.0).view(4, 8)
    row.weight_loader(row.weight, whole)
    assert torch.equal(row.weight, whole[:, 4:])
    with pytest.raises(ValueError, match=r"shape \[4, 10\], expected \[4, 8\]"):
        row.weight_loader(row.weight, torch.zeros(4, 10))
    merged.weight_loader(merged.weight, torch.ones(6, 4), 1)
    with pytest.raises(ValueError, match=r"shape \[8, 4\], expected \[6, 4\]"):
        merged.weight_loader(merged.weight, torch.zeros(8, 4), 0)
    qkv.weight_loader(qkv.weight, torch.ones(8, 4), "q")
    with pytest.raises(ValueError, match=r"shape \[6, 4\], expected \[4, 4\]"):
        qkv.weight_loader(qkv.weight, torch.zeros(6, 4), "k")
    embed.weight_loader(embed.weight, torch.ones(10, 4))
    with pytest.raises(ValueError, match=r"shape \[12, 4\], expected \[10, 4\]"):
        embed.weight_loader(embed.weight, torch.zeros(12, 4))


def test_a_quantized_checkpoint_is_refused(tmp_path):
    """An fp8 checkpoint (float8 weights with their scales) loaded as if plain: its weights were upcast without
    the scales. Refused by its quantization_config at LLM(), and by the weights' dtype without one."""
    folder = make_model(tmp_path / "m", "qwen3")
    edit_json(folder, "config.json", lambda c: c.update(quantization_config={"quant_method": "fp8"}))
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method 'fp8'\): quantized checkpoints are "
                                         r"not supported"):
        LLM(folder, **SMALL)
    edit_json(folder, "config.json", lambda c: c.pop("quantization_config"))
    name = "model.layers.0.mlp.down_proj.weight"
    edit_weights(folder, lambda w: w.update({name: w[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}' .* is torch.float8_e4m3fn: quantized checkpoints"):
        LLM(folder, **SMALL)


@pytest.mark.parametrize("bad_eos", [100000, -1])
def test_eos_ids_outside_the_vocabulary_are_left_out(tmp_path, bad_eos):
    """An EOS id no draw can produce (past the vocabulary, or -1) passed LLM(); min_tokens then indexed the logits
    with it (an IndexError, or -1 banning the last token). Now left out with a warning; the others stay."""
    folder = make_model(tmp_path / "m", "qwen3")
    edit_json(folder, "config.json", lambda c: c.update(eos_token_id=[bad_eos, 511]))
    with pytest.warns(UserWarning, match=rf"eos_token_id {bad_eos} is outside the model's vocabulary \[0, 512\)"):
        llm = LLM(folder, **SMALL)
    with llm:
        assert llm.config.eos == (511,)
        sp = SamplingParams(temperature=0, max_tokens=4, min_tokens=4, ignore_eos=True)
        assert len(llm.generate([[1, 2, 3]], sp, use_tqdm=False)[0]["token_ids"]) == 4


def test_a_tied_checkpoint_s_differing_lm_head_is_not_loaded_over_the_embedding(tmp_path, hf_reference):
    """tie_word_embeddings with an lm_head.weight unlike the embedding (e.g. in a later shard): it was copied into
    the shared tensor, so the input embedding became the head. As vLLM, the embedding is used, with a warning."""
    folder = make_model(tmp_path / "m", "qwen3", tie_word_embeddings=True)
    edit_weights(folder, lambda w: w.update({"lm_head.weight": w["model.embed_tokens.weight"].flip(0)}))
    with pytest.warns(UserWarning, match=r"'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        llm = LLM(folder, **SMALL)
    with llm:
        got = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]
    edit_weights(folder, lambda w: w.pop("lm_head.weight"))  # the embedding for both, as transformers ties it
    assert got == hf_reference(folder, [1, 2, 3], GREEDY.max_tokens)
    # one of another shape is refused by name, as any other (its check ran outside the naming wrapper)
    edit_weights(folder, lambda w: w.update({"lm_head.weight": torch.zeros(600, 64)}))
    with pytest.raises(ValueError, match=r"'lm_head.weight' of .* does not fit .*: shape \[600, 64\], expected"):
        LLM(folder, **SMALL)


def shard(folder: str, names_per_file: list[list[str]]) -> dict:
    """Split the folder's model.safetensors into model-0000i-of-0000n.safetensors with an index."""
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    weight_map = {}
    for i, names in enumerate(names_per_file, 1):
        file = f"model-{i:05d}-of-{len(names_per_file):05d}.safetensors"
        save_file({n: weights[n] for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return weights


def test_sharded_checkpoints_load_the_files_their_index_names(tmp_path, hf_reference):
    """The files are chosen as transformers chooses them: the shards an index names (a missing one is named at
    LLM(), not reported as some tensors it held), and model.safetensors where there is one."""
    from safetensors.torch import save_file
    folder = make_model(tmp_path / "m", "qwen3")
    expect = hf_reference(folder, [1, 2, 3], GREEDY.max_tokens)
    from safetensors.torch import load_file
    names = sorted(load_file(os.path.join(folder, "model.safetensors")))
    weights = shard(folder, [names[:len(names) // 2], names[len(names) // 2:]])
    # a stray file the index does not name (e.g. left from another conversion) is not read
    save_file({n: torch.zeros_like(w) for n, w in weights.items()}, os.path.join(folder, "stray.safetensors"))
    with LLM(folder, **SMALL) as llm:
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == expect
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match=r"index.json names weight files that are not in the folder: "
                                         r"\['model-00002-of-00002.safetensors'\]"):
        LLM(folder, **SMALL)
    save_file(weights, os.path.join(folder, "model.safetensors"))  # beside the index: the one transformers reads
    with LLM(folder, **SMALL) as llm:
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == expect


def test_an_index_may_name_shards_in_subfolders_not_outside(tmp_path, hf_reference):
    """transformers joins the index's file names to the folder, so shards may sit in a subfolder; a name that
    leaves the folder is refused."""
    from safetensors import safe_open
    folder = make_model(tmp_path / "m", "qwen3")
    expect = hf_reference(folder, [1, 2, 3], GREEDY.max_tokens)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    shard(folder, [names])
    os.mkdir(os.path.join(folder, "weights"))
    file = "model-00001-of-00001.safetensors"
    os.rename(os.path.join(folder, file), os.path.join(folder, "weights", file))
    edit_json(folder, "model.safetensors.index.json",
              lambda d: d.update(weight_map=dict.fromkeys(names, f"weights/{file}")))
    with LLM(folder, **SMALL) as llm:
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"] == expect
    edit_json(folder, "model.safetensors.index.json",
              lambda d: d.update(weight_map=dict.fromkeys(names, f"../{file}")))
    with pytest.raises(ValueError, match=rf"names weight files outside the model folder: \['../{file}'\]"):
        LLM(folder, **SMALL)
