"""Loading never runs code from a model folder: safetensors only, trust_remote_code=False by
default, nothing in a config or tokenizer is evaluated."""

from __future__ import annotations

import json

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from conftest import tiny_model


@pytest.fixture
def saved(tmp_path, demo):
    model = tiny_model("gpt2", len(demo.tokenizer))
    model.save_pretrained(tmp_path)
    demo.tokenizer.save_pretrained(tmp_path)
    return tmp_path, model


def test_pickled_weights_are_refused(saved):
    folder, model = saved
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="no safetensors weights.*loads safetensors only"):
        ii.load_model(folder)


def test_remote_code_in_a_config_is_never_run(saved):
    folder, model = saved
    marker = folder / "ran.txt"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import GPT2LMHeadModel as Evil\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    config["task_specific_params"] = {"x": "__import__('os').system('touch " f"{marker}')"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = ii.load_model(folder)
    assert not marker.exists()
    assert type(loaded.module).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(loaded.module.lm_head.weight, model.lm_head.weight)


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tmp_path):
    seen = {}

    def record(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(RuntimeError, match="stop"):
        ii.load_model(tmp_path)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
