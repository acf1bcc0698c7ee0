"""Security basics: no pickle anywhere (weights from safetensors/GGUF, torch.load only with
weights_only=True), remote code only when the user asks for it."""
import ast
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError

PACKAGE = Path(__file__).resolve().parents[1] / "harness"


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            full = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else \
                getattr(f, "id", None)
            if full == name:
                yield node


def test_no_pickle_in_the_package():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle library")
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
    assert not problems, problems


def _tiny_dir(tmp_path, safe: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, head_dim=16)
    folder = tmp_path / ("safe" if safe else "pickled")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    if not safe:  # the old pickled format (transformers 5 only writes safetensors itself)
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer(bos=False).save_pretrained(folder)
    return folder


def test_pickled_checkpoints_are_refused(tmp_path):
    from harness.models import load_model

    load_model(str(_tiny_dir(tmp_path, safe=True)), device="cpu")  # safetensors: loads
    pickled = _tiny_dir(tmp_path, safe=False)
    with pytest.raises(HarnessError, match="pickled weights"):
        load_model(str(pickled), device="cpu")


def test_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    from harness.models import load_model

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.append(k.get("trust_remote_code"))
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    folder = str(_tiny_dir(tmp_path, safe=True))
    load_model(folder, device="cpu")
    load_model(folder, device="cpu", trust_remote_code=True)
    assert seen == [False, True]
