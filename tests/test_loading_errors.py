"""Every model-loading mistake is an InputError naming the path; offloaded models run."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.model.loading import looks_local, summarize_names
from ipy_intervene.sweep import memory
from conftest import CORRUPT, PROMPT

CELL = ("h = model.transformer.h[0].output\n"
        "model.transformer.h[1].mlp.output[:, -1] = 0\n"
        "logits = model.lm_head.output\n")


def tiny_gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).eval()


def tiny_llama(vocab: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, max_position_embeddings=32,
                                        tie_word_embeddings=tie)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, demo) -> Path:
    """A tiny GPT-2 with the demo tokenizer, saved as one model.safetensors."""
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(len(demo.tokenizer)).save_pretrained(folder)
    demo.tokenizer.save_pretrained(folder)
    return folder


def copy_of(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def rewrite_weights(folder: Path, change) -> None:
    weights = load_file(folder / "model.safetensors")
    save_file(change(weights), folder / "model.safetensors", metadata={"format": "pt"})


# -- 1. a folder that is not there ----------------------------------------------------------

def test_a_missing_folder_is_named_instead_of_sent_to_the_hub(saved):
    with pytest.raises(InputError, match=rf"{saved.parent}.* has no '{saved.name}x'.*did you "
                                         rf"mean '{saved}'"):
        ii.load_model(f"{saved}x")
    with pytest.raises(InputError, match="no/such: no such folder.*nearest folder that exists"):
        ii.load_model("./no/such")
    with pytest.raises(InputError, match="no such folder"):
        ii.load_model(Path("nowhere"))


def test_names_are_local_when_shaped_like_paths(tmp_path, monkeypatch):
    assert not looks_local("gpt2") and not looks_local("openai-community/gpt2")
    assert looks_local("./gpt2") and looks_local("~/models/gpt2") and looks_local("a/b/c")
    assert looks_local("/abs") and looks_local(Path("gpt2")) and looks_local("bad name")
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_local("models/gpt2")  # exists partially


def test_an_unknown_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="'someone/no-such-model' is not a folder here.*Hugging "
                                         "Face hub did not provide it.*check the name"):
        ii.load_model("someone/no-such-model")


# -- 2.-4. broken weights files -----------------------------------------------------------------

def test_a_missing_shard_is_named(tmp_path, demo):
    tiny_gpt2(len(demo.tokenizer)).save_pretrained(tmp_path, max_shard_size="60KB")
    demo.tokenizer.save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(InputError, match=rf"lists 1 weights file\(s\) that are not in the "
                                         rf"folder: {shards[-1].name}\. .*incomplete"):
        ii.load_model(tmp_path)


def test_a_weights_file_path_asks_for_its_folder(saved):
    with pytest.raises(InputError, match=rf"model.safetensors is a weights file, not a folder.*"
                                         rf"ii.load_model\('{saved}'\)"):
        ii.load_model(saved / "model.safetensors")
    with pytest.raises(InputError, match=rf"tokenizer.json is a file.*tokenizer='{saved}'"):
        ii.load_model(saved, tokenizer=saved / "tokenizer.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_weights_file_is_named(saved, tmp_path, damage):
    folder = copy_of(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x07" * 4000)
    with pytest.raises(InputError, match=rf"{weights}: the weights file is truncated or corrupt"
                                         r".*download it again, or re-save"):
        ii.load_model(folder)


def test_a_folder_without_config_json_says_so(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(InputError, match=rf"{folder}: no config.json.*holds generation_config"):
        ii.load_model(folder)


# -- 5. the tokenizer ---------------------------------------------------------------------------

def test_a_folder_without_tokenizer_files_says_which_files_and_how(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    for file in folder.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(InputError, match=rf"{folder} has no tokenizer files: expected "
                                         r"tokenizer.json, tokenizer_config.json or vocab "
                                         r"files.*tokenizer='gpt2'"):
        ii.load_model(folder)
    from_folder = ii.load_model(folder, tokenizer=saved)
    from_object = ii.load_model(folder, tokenizer=from_folder.tokenizer)
    assert from_folder.to_str_tokens("When Mary") == from_object.to_str_tokens("When Mary")
    assert len(from_folder.to_str_tokens("When Mary")) >= 2


def test_tokenizer_files_that_make_no_tokenizer_are_an_input_error(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "tokenizer.json").unlink()  # tokenizer_config.json alone names a class only
    with pytest.raises(InputError, match=rf"{folder} has tokenizer files that make no "
                                         r"tokenizer.*tokenizer='gpt2'"):
        ii.load_model(folder)


def test_wrap_keeps_taking_a_tokenizer(demo):
    model = ii.wrap(tiny_gpt2(len(demo.tokenizer)), demo.tokenizer)
    assert model.tokenizer is demo.tokenizer and model.to_tokens(PROMPT).shape[1] > 1


def test_a_bad_dtype_name_is_an_input_error(saved):
    with pytest.raises(InputError, match="dtype='flaot16' is not a torch dtype"):
        ii.load_model(saved, dtype="flaot16")


# -- 6. weights the checkpoint lacks ------------------------------------------------------------

def test_missing_weights_are_an_error_unless_allowed(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if ".h.1." not in k})
    with pytest.raises(InputError, match=r"12 weight\(s\) of the model are not in the "
                                         r"checkpoint.*transformer.h.1.\* \(12 tensors\).*"
                                         r"allow_missing_weights=True"):
        ii.load_model(folder)
    with pytest.warns(UserWarning, match=r"transformer.h.1.\* \(12 tensors\)"):
        model = ii.load_model(folder, allow_missing_weights=True)
    assert len(model.transformer.h) == 2


def test_weights_the_model_does_not_use_are_an_error_unless_allowed(saved):
    """A keyword that overrides config.json (one layer of a two-layer checkpoint) would load
    another model than the one saved, with no error from transformers, only a report."""
    with pytest.raises(InputError, match=r"11 weight\(s\) in the checkpoint are not used by "
                                         r"the model.*transformer.h.1.\* \(11 tensors\)"):
        ii.load_model(saved, n_layer=1)
    with pytest.warns(UserWarning, match="not used by the model"):
        model = ii.load_model(saved, n_layer=1, allow_missing_weights=True)
    assert len(model.transformer.h) == 1


def test_a_shape_mismatch_is_an_error_naming_both_shapes(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    rewrite_weights(folder, lambda w: {**w, "transformer.wpe.weight": torch.zeros(16, 32)})
    with pytest.raises(InputError, match=r"transformer.wpe.weight \[16, 32\] in the checkpoint "
                                         r"vs \[32, 32\] in the model"):
        ii.load_model(folder)
    with pytest.warns(UserWarning, match="another shape"):
        ii.load_model(folder, allow_missing_weights=True)


@pytest.mark.parametrize("arch, tie", [("gpt2", True), ("llama", True), ("llama", False)])
def test_tied_embeddings_are_not_missing_weights(tmp_path, demo, arch, tie):
    module = tiny_gpt2(len(demo.tokenizer)) if arch == "gpt2" else \
        tiny_llama(len(demo.tokenizer), tie)
    module.save_pretrained(tmp_path)
    demo.tokenizer.save_pretrained(tmp_path)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tie
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ii.load_model(tmp_path)
    assert torch.equal(loaded.module.lm_head.weight, module.lm_head.weight)


def test_many_missing_names_are_grouped_by_layer():
    names = [f"model.layers.{i}.{p}" for i in (0, 1, 2, 5) for p in "abc"] + ["lm_head.weight"]
    assert summarize_names(names) == "model.layers.[0-2, 5].* (12 tensors), lm_head.weight"
    assert summarize_names(["a.weight", "b.weight"]) == "a.weight, b.weight"


# -- 7. weights offloaded to disk ---------------------------------------------------------------

OFFLOADS = {
    "disk": {"device_map": {"": "disk"}},
    "auto": {"device_map": "auto", "max_memory": {"cpu": 1000}},
    "mixed": {"device_map": {"transformer.wte": "cpu", "transformer.wpe": "cpu",
                             "transformer.drop": "cpu", "transformer.h.0": "cpu",
                             "transformer.h.1": "disk", "transformer.ln_f": "cpu",
                             "lm_head": "cpu"}},
}


@pytest.fixture(scope="module", params=list(OFFLOADS))
def offloaded(request, saved, tmp_path_factory) -> ii.Model:
    return ii.load_model(saved, offload_folder=tmp_path_factory.mktemp("offload"),
                         **OFFLOADS[request.param])


@pytest.fixture(scope="module")
def in_memory(saved) -> ii.Model:
    return ii.load_model(saved)


def test_an_offloaded_model_takes_inputs_where_it_runs(offloaded):
    assert any(p.device.type == "meta" for p in offloaded.module.parameters())
    assert offloaded.device == torch.device("cpu")
    assert memory.budget(offloaded.device, 0.25) > 0
    assert memory.budget(torch.device("meta"), 0.25) > 0


def test_an_offloaded_trace_equals_the_in_memory_one(offloaded, in_memory):
    ns_disk, ns_mem = {"model": offloaded}, {"model": in_memory}
    ii.trace(offloaded, CELL, PROMPT, namespace=ns_disk)
    ii.trace(in_memory, CELL, PROMPT, namespace=ns_mem)
    for name in ("h", "logits"):
        torch.testing.assert_close(ns_disk[name], ns_mem[name], atol=1e-5, rtol=0)


def test_an_offloaded_trace_magic_equals_the_in_memory_one(shell, offloaded, in_memory):
    results = []
    for model in (offloaded, in_memory):
        shell.user_ns["model"] = model
        shell.run_cell(f'%%trace model "{PROMPT}"\n{CELL}')
        results.append(shell.user_ns["logits"])
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


def test_an_offloaded_sweep_equals_the_in_memory_one(offloaded, in_memory):
    metric, few = ii.logit_diff("Mary", "John"), [0, 9, 10, 14]  # 10: where the prompts differ
    disk = ii.patch_sweep(offloaded, PROMPT, CORRUPT, metric, positions=few)
    mem = ii.patch_sweep(in_memory, PROMPT, CORRUPT, metric, positions=few)
    assert torch.as_tensor(mem.values).abs().sum() > 0
    torch.testing.assert_close(torch.as_tensor(disk.values), torch.as_tensor(mem.values),
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_an_offloaded_module_called_ad_hoc_runs_where_it_runs(offloaded, in_memory):
    cell = "h = model.transformer.h[1].output\nnormed = model.transformer.ln_f(h)\n"
    ns_disk, ns_mem = {"model": offloaded}, {"model": in_memory}
    ii.trace(offloaded, cell, PROMPT, namespace=ns_disk)
    ii.trace(in_memory, cell, PROMPT, namespace=ns_mem)
    torch.testing.assert_close(ns_disk["normed"], ns_mem["normed"], atol=1e-5, rtol=0)
